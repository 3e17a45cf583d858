"""Image-level anomaly score from the mask probability map (OURS, Table I's image AUROC; ``model.score``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vmad.model.config import ScoreConfig


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps (reflect padding, radius 4 sigma)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(4 * sigma)))
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    y = x[:, None]
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    kh = k[radius - pad_h : radius + pad_h + 1]
    kw = k[radius - pad_w : radius + pad_w + 1]
    y = F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"), (kh / kh.sum()).view(1, 1, -1, 1))
    y = F.conv2d(F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect"), (kw / kw.sum()).view(1, 1, 1, -1))
    return y[:, 0]


def image_scores(probs: Tensor, cfg: ScoreConfig) -> Tensor:
    """Image-level score from ``[B, H, W]`` mask probabilities by ``cfg.rule`` (OURS, see ScoreConfig)."""
    if cfg.rule == "max":
        return probs.flatten(1).amax(1)
    if cfg.rule == "mean_topk":
        flat = probs.flatten(1)
        k = max(1, int(round(cfg.topk_ratio * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    return gaussian_blur(probs.float(), cfg.sigma).flatten(1).amax(1)
