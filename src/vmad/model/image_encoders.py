"""Frozen vision encoders F_I (Eq. 1) and visual backbones V_backbone (Eq. 4).

Every encoder takes images in [0, 1], ``[B, 3, H, W]`` at any size, resizes them to its ``image_size``,
normalises them itself, and returns ``(last, levels)``: the feature layer ``[B, N, C]`` (N = grid², row-major)
and the ``n_levels`` layers before it, oldest first (Eq. 21 uses layers L-n-1 .. L-2 before the last one).
Backbones return a list of feature maps ``[B, C_i, h, w]`` for the mask decoder's neck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.errors import VMADError
from vmad.model.config import BackboneConfig, VisionConfig
from vmad.model.layers import param_dtype, tokens_to_map

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)


class FrozenImageModule(nn.Module):
    """Resize + normalise helper; the wrapped network is frozen and kept in eval mode."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        """Resize and normalise in float32, then cast to the network's weight dtype."""
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return ((x - self.mean.float()) / self.std.float()).to(param_dtype(self))

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenImageModule:  # frozen: BatchNorm / dropout stay in eval
        return super().train(False)


class TinyVisionEncoder(FrozenImageModule):
    """Random ViT for tests: patch conv + ``layers`` pre-norm transformer layers; CLIP-like hidden states."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.grid = cfg.image_size // cfg.patch
        self.out_dim = cfg.width
        self.level_dims = [cfg.width] * cfg.n_levels
        self.n_levels = cfg.n_levels
        self.feature_layer = cfg.feature_layer
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, cfg.width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(cfg.layers)
        )
        self.freeze()

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.patch(self.prepare(images)).flatten(2).transpose(1, 2) + self.pos
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return _select(hidden, self.feature_layer, self.n_levels)


def _select(hidden: list[Tensor], feature_layer: int, n_levels: int) -> tuple[Tensor, list[Tensor]]:
    """The feature layer and the ``n_levels`` hidden states just before it, oldest first."""
    idx = feature_layer % len(hidden)
    if idx - n_levels < 0:
        raise ValueError(f"{n_levels} levels before layer {idx} do not exist")
    return hidden[idx], hidden[idx - n_levels : idx]


class EfficientNetVisionEncoder(FrozenImageModule):
    """EfficientNet-Lite0 (small preset): its stride-16 MBConv blocks as tokens. The last stride-16 block is
    ``last`` (112 channels) and the 4 before it the levels (80, 80, 112, 112 channels); at 384x384 input the
    grid is 24x24 = 576 tokens, the paper's CLIP grid, so LTC with rho = 2 gives the paper's 144 tokens."""

    def __init__(self, backbone: nn.Module, cfg: VisionConfig) -> None:
        from vmad.model.efficientnet import LITE0_MEAN, LITE0_STD

        super().__init__(cfg.image_size, LITE0_MEAN, LITE0_STD)
        self.net = backbone
        stride16 = backbone.block_indices_at_stride(16)
        if len(stride16) < cfg.n_levels + 1:
            raise ValueError(
                f"EfficientNet-Lite0 has {len(stride16)} stride-16 blocks, need {cfg.n_levels + 1}"
            )
        self.indices = stride16[-(cfg.n_levels + 1) :]
        specs = backbone.blocks
        self.out_dim = specs[self.indices[-1]].out_channels
        self.level_dims = [specs[i].out_channels for i in self.indices[:-1]]
        self.grid = -(-cfg.image_size // 16)
        self.n_levels = cfg.n_levels
        self.freeze()

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        outs = self.net.forward_blocks(self.prepare(images), upto=self.indices[-1])
        toks = [outs[i].flatten(2).transpose(1, 2) for i in self.indices]
        return toks[-1], toks[:-1]


class CLIPVisionEncoder(FrozenImageModule):
    """CLIP ViT-L/14-336 (paper preset, LLaVA-1.5's tower): hidden state ``feature_layer`` (-2, as LLaVA)
    without CLS as ``last`` (24x24 = 576 tokens), the ``n_levels`` hidden states before it as levels."""

    def __init__(self, clip: nn.Module, cfg: VisionConfig) -> None:
        super().__init__(clip.config.image_size, CLIP_MEAN, CLIP_STD)
        self.clip = clip
        self.grid = clip.config.image_size // clip.config.patch_size
        self.out_dim = clip.config.hidden_size
        self.level_dims = [self.out_dim] * cfg.n_levels
        self.n_levels = cfg.n_levels
        self.feature_layer = cfg.feature_layer
        self.freeze()

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.prepare(images).to(self.clip.dtype)
        out = self.clip(pixel_values=x, output_hidden_states=True)
        hidden = [h[:, 1:] for h in out.hidden_states]
        return _select(hidden, self.feature_layer, self.n_levels)


def clip_vit_l14_336_config() -> object:
    """CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-1.5."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


class TinyConvBackbone(FrozenImageModule):
    """Random stride-8 conv backbone for the tiny preset (separate from the encoder, like SAM in the
    paper)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(w // 2, w, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(w, w, 3, 2, 1),
        )
        self.out_channels = [w]
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.net(self.prepare(images))]


class SamBackbone(FrozenImageModule):
    """SAM's image encoder (ViT-H in the paper preset): 1024x1024 input -> one 256-channel 64x64 embedding.

    OURS: images are resized to the square input (no aspect-preserving pad); industrial images are mostly
    square."""

    def __init__(self, encoder: nn.Module, image_size: int = 1024) -> None:
        super().__init__(image_size, SAM_MEAN, SAM_STD)
        self.encoder = encoder
        self.out_channels = [encoder.config.output_channels]
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.prepare(images).to(next(self.encoder.parameters()).dtype)
        return [self.encoder(x)[0]]


def tokens_to_maps(last: Tensor, levels: list[Tensor], grid: int) -> list[Tensor]:
    """Encoder tokens ``[B, grid², C]`` (levels first, then last) as maps ``[B, C, grid, grid]`` (shared
    backbone)."""
    return [tokens_to_map(t, grid) for t in [*levels, last]]


def as_image_batch(images: Tensor) -> Tensor:
    """``[3, H, W]`` or ``[B, 3, H, W]`` images in [0, 1] as a batch; anything else is a clear error."""
    images = images[None] if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] != 3:
        raise VMADError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    return images
