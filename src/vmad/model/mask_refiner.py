"""The full-resolution mask refiner (OURS, not in the paper): thin and small defects at pixel precision.

SAM's decoder (Eq. 5) predicts at 4x its embedding grid (96 x 96 for the small preset's 24 x 24 tokens), then
the logits are upsampled to the image: a 1-3 px crack becomes a 10-20 px band and its IoU stays near 0.1 even
when the band is in the right place. The refiner is a small fully convolutional net at the image's own
resolution. It sees the image's luminance (standardised per image) and the decoder's upsampled logits and adds
a learned correction:

    out = L * tanh(logits / L) + s * Δ(image, logits)        (shrink-only: s * min(Δ, 0))

``L * tanh(. / L)`` keeps the order and sign of every logit (so with Δ = 0 the binary mask at probability 0.5
is the decoder's own) while bounding how far a logit stands from 0 (the prior skip reaches 100 logit units,
which no correction could bring back). Δ is zero at initialisation (zero-initialised head): an untrained
refiner changes no mask. It is trained alone, on synthetic defects over normal images, with the rest of the
model frozen (:mod:`vmad.train.refiner`, ``vmad model add-refiner``). Only the binary mask is taken from it
(:meth:`vmad.model.vmad.VMADModel.refined_mask_logits`, used by :class:`vmad.infer.detector.Detector`); the
anomaly maps and image scores stay the decoder's (refining them cost pixel AUROC and AUPRO on real data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from vmad.model.config import MaskDecoderConfig

#: ITU-R BT.601 luma weights (the refiner sees grey: the synthetic defects it is trained on carry no
#: colour cue that a grey image would lack).
LUMA = (0.299, 0.587, 0.114)


class MaskRefiner(nn.Module):
    """Residual dilated 3x3 convolutions over (luminance, logits / L); ``dilations`` sets depth and reach
    (receptive field 1 + 2 * (1 + sum(dilations)) px)."""

    def __init__(
        self, width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8, 1), limit: float = 20.0,
        max_side: int = 384, shrink: bool = False,
    ) -> None:
        super().__init__()
        self.shrink = bool(shrink)
        self.limit = float(limit)
        self.max_side = int(max_side)
        self.inp = nn.Conv2d(2, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.scale = nn.Parameter(torch.tensor([10.0]))

    @classmethod
    def from_config(cls, cfg: MaskDecoderConfig) -> MaskRefiner | None:
        """The refiner ``cfg`` (``model.mask_decoder``) asks for, or None when ``cfg.refiner`` is off."""
        if not cfg.refiner:
            return None
        return cls(cfg.refiner_width, cfg.refiner_dilations, cfg.refiner_limit, cfg.refiner_max_side,
                   cfg.refiner_shrink)

    def bounded(self, logits: Tensor) -> Tensor:
        """``L * tanh(logits / L)``: order- and sign-preserving, within (-L, L)."""
        return self.limit * torch.tanh(logits / self.limit)

    def unbounded(self, refined: Tensor) -> Tensor:
        """The inverse of :meth:`bounded` (``L * atanh(x / L)``, ``x / L`` clipped to ±(1 - 1e-6)): refined
        logits back on the decoder's scale, so that a mask threshold means what it means without the
        refiner (calibrated thresholds far from 0.5 included); an untrained refiner gives the input back."""
        return self.limit * torch.atanh((refined / self.limit).clamp(-1 + 1e-6, 1 - 1e-6))

    def forward(self, images: Tensor, logits: Tensor) -> Tensor:
        """``images [K, 3, H', W']`` in [0, 1] (resized to the logits' size when they differ), ``logits
        [K, H, W]`` -> refined logits ``[K, H, W]``. Above ``max_side`` px (longest side; 0 = never) the
        correction is computed on both reduced to that size and added back bilinearly upsampled."""
        dtype = self.inp.weight.dtype
        size = tuple(logits.shape[-2:])
        work = size
        if self.max_side and max(size) > self.max_side:
            s = self.max_side / max(size)
            work = (max(1, round(size[0] * s)), max(1, round(size[1] * s)))
        x = images.to(dtype)
        if x.shape[-2:] != work:
            x = F.interpolate(x, size=work, mode="bilinear", align_corners=False, antialias=True)
        luma = torch.tensor(LUMA, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        grey = (x * luma).sum(1, keepdim=True)
        grey = (grey - grey.mean((2, 3), keepdim=True)) / (grey.std((2, 3), keepdim=True) + 1e-3)
        base = self.bounded(logits.to(dtype))[:, None]
        small = base if work == size else F.interpolate(base, size=work, mode="bilinear", align_corners=False,
                                                        antialias=True)
        h = F.relu(self.inp(torch.cat([grey, small / 8.0], 1)))
        for block in self.blocks:
            h = h + F.relu(block(h))
        delta = self.head(h)
        if self.shrink:  # clamp's gradient passes at 0, where the zero-initialised head starts
            delta = delta.clamp(max=0.0)
        if work != size:
            delta = F.interpolate(delta, size=size, mode="bilinear", align_corners=False)
        return (base + self.scale * delta)[:, 0].to(logits.dtype)
