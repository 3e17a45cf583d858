"""Frozen vision encoders F_I (Eq. 1) and visual backbones V_backbone (Eq. 4).

Every encoder takes images in [0, 1], ``[B, 3, H, W]`` at any size, resizes them to its ``image_size``,
normalises them itself, and returns ``(last, levels)``: the feature layer ``[B, N, C]`` (N = grid², row-major)
and the ``n_levels`` layers before it, oldest first (Eq. 21 uses layers L-n-1 .. L-2 before the last one).
Backbones return a list of feature maps ``[B, C_i, h, w]`` for the mask decoder's neck.
"""

from __future__ import annotations

import numpy as np
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
    """Resize + normalise, and the inverse for masks; the wrapped network is frozen and kept in eval mode.

    ``resize`` (``vision.resize`` / ``backbone.resize``):
    - ``pad_square``: LLaVA-1.5's rule: pad to a square with the mean colour (centred), then resize to the
      input side with PIL's bicubic filter (antialiased), as transformers' LLaVA/CLIP image processor does;
    - ``longest_side``: SAM's rule: longest side resized to the input side (PIL bilinear, antialiased), then
      zero padding at the bottom and right after normalisation, as ``SamImageProcessor``;
    - ``stretch``: bilinear resize to the square, no antialias (models saved before these rules existed).
    Masks predicted in the input frame are mapped back through the inverse (:meth:`to_image`).

    ``resize_on_device`` (the GPU fast path, :mod:`vmad.model.fastpath`): ``pad_square`` / ``longest_side``
    run as batched tensor ops where the images are (antialiased bicubic / bilinear ``F.interpolate``, with
    PIL's 8-bit rounding) instead of PIL on the host; they match PIL to about one grey level.
    """

    def __init__(
        self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], resize: str = "stretch"
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.resize = resize
        self.mean_values = tuple(float(m) for m in mean)
        self.resize_on_device = False
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> the normalised square input, in the network's weight dtype."""
        side = self.image_size
        if self.resize == "stretch":
            x = images.float()
            if tuple(x.shape[-2:]) != (side, side):
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            x = (x - self.mean.float()) / self.std.float()
        elif self.resize_on_device:
            x = self._prepare_on_device(images)
        else:
            x = torch.stack([self._prepare_one(image) for image in images]).to(images.device)
        return x.to(param_dtype(self))

    def _prepare_on_device(self, images: Tensor) -> Tensor:
        """``pad_square`` / ``longest_side`` as batched tensor ops (see the class docstring)."""
        x = (images.float().clamp(0, 1) * 255).round()  # the 8-bit picture PIL would see
        height, width = x.shape[-2:]
        side = self.image_size
        if self.resize == "pad_square":
            square = max(height, width)
            colour = torch.tensor([int(m * 255) for m in self.mean_values], dtype=x.dtype, device=x.device)
            canvas = colour.view(1, 3, 1, 1).expand(x.shape[0], 3, square, square).clone()
            top, left = (square - height) // 2, (square - width) // 2
            canvas[..., top : top + height, left : left + width] = x
            x = _resize_like_pil(canvas, (side, side), "bicubic")
        else:
            x = _resize_like_pil(x, _longest_side(height, width, side), "bilinear")
        x = x / 255.0
        x = (x - self.mean.float()) / self.std.float()
        if self.resize == "longest_side":
            x = F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
        return x

    def _prepare_one(self, image: Tensor) -> Tensor:
        from PIL import Image

        array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        picture = Image.fromarray(array.cpu().numpy())
        height, width = array.shape[:2]
        side = self.image_size
        if self.resize == "pad_square":
            square = max(height, width)
            colour = tuple(int(m * 255) for m in self.mean_values)
            canvas = Image.new("RGB", (square, square), colour)
            canvas.paste(picture, ((square - width) // 2, (square - height) // 2))
            picture = canvas.resize((side, side), Image.Resampling.BICUBIC)
        else:
            new_height, new_width = _longest_side(height, width, side)
            picture = picture.resize((new_width, new_height), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - self.mean[0].float().cpu()) / self.std[0].float().cpu()
        if self.resize == "longest_side":
            x = F.pad(x, (0, side - x.shape[2], 0, side - x.shape[1]))
        return x

    def to_image(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """Maps ``[B, C, h, w]`` over the square input frame -> ``[B, C, H, W]`` over the original image (the
        inverse of :meth:`prepare`: un-pad, un-resize)."""
        height, width = size
        if self.resize == "stretch":
            return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if self.resize == "pad_square":
            square = max(height, width)
            full = F.interpolate(maps, size=(square, square), mode="bilinear", align_corners=False)
            top, left = (square - height) // 2, (square - width) // 2
            return full[..., top : top + height, left : left + width]
        side = self.image_size
        full = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
        new_height, new_width = _longest_side(height, width, side)
        valid = full[..., :new_height, :new_width]
        return F.interpolate(valid, size=size, mode="bilinear", align_corners=False)

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenImageModule:  # frozen: BatchNorm / dropout stay in eval
        return super().train(False)


class TinyVisionEncoder(FrozenImageModule):
    """Random ViT for tests: patch conv + ``layers`` pre-norm transformer layers; CLIP-like hidden states."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cfg.resize)
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


def _resize_like_pil(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """8-bit levels ``[B, C, H, W]`` resized as PIL does: antialiased, the horizontal pass first, each pass
    rounded and clamped to 0-255."""
    height, width = size
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode=mode, antialias=True, align_corners=False)
        x = x.clamp(0, 255).round()
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)
        x = x.clamp(0, 255).round()
    return x


def _longest_side(height: int, width: int, side: int) -> tuple[int, int]:
    """Size with the longest side at ``side`` (SAM's rounding)."""
    scale = side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


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

        super().__init__(cfg.image_size, LITE0_MEAN, LITE0_STD, cfg.resize)
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
        super().__init__(clip.config.image_size, CLIP_MEAN, CLIP_STD, cfg.resize)
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
        super().__init__(cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cfg.resize)
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
    """SAM's image encoder (ViT-H in the paper preset): 1024x1024 input -> one 256-channel 64x64 embedding;
    images prepared as SAM expects (``longest_side``: longest side 1024, zero padding)."""

    def __init__(self, encoder: nn.Module, image_size: int = 1024, resize: str = "longest_side") -> None:
        super().__init__(image_size, SAM_MEAN, SAM_STD, resize)
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
