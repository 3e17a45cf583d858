"""Building blocks shared by the model parts: channel LayerNorm for maps, the token <-> map reshape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (SAM's neck and decoder; LTC's ResNet blocks)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def param_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (``default`` without one): inputs are cast to
    it, so a model cast as a whole (e.g. to bf16 by DeepSpeed) runs without dtype errors."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def grid_side(num_tokens: int) -> int:
    """Side of a square token grid; raises ValueError when ``num_tokens`` is not a square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def tokens_to_map(tokens: Tensor, side: int | None = None) -> Tensor:
    """``[B, side*side, C]`` row-major tokens -> ``[B, C, side, side]`` (side inferred when None)."""
    side = grid_side(tokens.shape[1]) if side is None else side
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def map_to_tokens(feature_map: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` row-major tokens."""
    return feature_map.flatten(2).transpose(1, 2)
