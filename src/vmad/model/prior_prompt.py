"""OURS, not in the paper: a zero-shot normality prior fed to the mask decoder of Eq. 5.

SAM's prompt encoder takes a dense mask input beside the sparse prompts; VMAD's decoder gets only H_seg
(Eq. 4) and SAM's "no mask" dense embedding. With ``mask_decoder.prior_prompt`` on, a prior map computed
without training for the image at hand (mutual scoring against the other images of a folder and/or
reference normal images, :mod:`vmad.baselines.prior`) is encoded SAM's way (two stride-2 convs with LayerNorm
and GELU, then a 1x1 conv to the prompt width) and added to the dense embedding, so the decoder refines
evidence instead of inventing it. ``mask_decoder.prior_skip`` also adds ``w * prior`` to the output logits
(a learned scalar ``w``, stored as ``w / SKIP_GAIN``), or ``w * (prior - offset)`` with
``mask_decoder.prior_skip_offset`` (the prior's neutral point for the mask).

Both start at zero (last conv and ``w``; ``mask_decoder.prior_skip_init`` may start ``w`` elsewhere), so a
model given the module behaves as before until trained. The prior is in standard units (0 = a typical patch of
the set, :func:`vmad.baselines.prior.standardize`); an image without a prior gets the plain "no mask"
embedding, the model's behaviour without this option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmad.model.layers import LayerNorm2d

#: standard units are clipped to this range before encoding (a few extreme patches must not dominate)
PRIOR_CLIP = (-4.0, 12.0)
#: the skip's weight is ``SKIP_GAIN * parameter``: a zero-initialised scalar trained with the decoder's
#: learning rate would otherwise move by about lr per step (Adam) and stay near 0 in a short fine-tune
SKIP_GAIN = 20.0


class PriorPrompt(nn.Module):
    """Prior map ``[B, 1, H, W]`` over the model's input frame -> dense prompt ``[B, dim, h, w]`` (+ skip)."""

    def __init__(self, dim: int, skip: bool = True, skip_init: float = 0.0, skip_offset: float = 0.0) -> None:
        super().__init__()
        self.skip_offset = float(skip_offset)
        mid = max(4, dim // 16)  # SAM: mask_in_chans 16 for a 256-wide prompt
        self.encode = nn.Sequential(
            nn.Conv2d(1, mid // 4 or 1, 2, stride=2),
            LayerNorm2d(mid // 4 or 1),
            nn.GELU(),
            nn.Conv2d(mid // 4 or 1, mid, 2, stride=2),
            LayerNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, dim, 1),
        )
        nn.init.zeros_(self.encode[-1].weight)
        nn.init.zeros_(self.encode[-1].bias)
        self.skip_weight = nn.Parameter(torch.full((1,), skip_init / SKIP_GAIN)) if skip else None

    @staticmethod
    def clip(prior: Tensor) -> Tensor:
        return prior.float().clamp(*PRIOR_CLIP)

    def dense(self, prior: Tensor, grid: tuple[int, int]) -> Tensor:
        """The dense prompt at the image-embedding ``grid`` (the prior is resampled to 4x the grid first,
        as SAM's low-resolution mask input)."""
        h, w = grid
        x = F.interpolate(self.clip(prior), size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        return self.encode(x.to(self.encode[0].weight.dtype))

    def skip(self, prior: Tensor, size: tuple[int, int]) -> Tensor | None:
        """``w * (prior - offset)`` at the low-resolution logits' ``size``, or None without the skip."""
        if self.skip_weight is None:
            return None
        x = F.interpolate(self.clip(prior), size=size, mode="bilinear", align_corners=False)
        x = x - self.skip_offset
        return (SKIP_GAIN * self.skip_weight.float() * x)[:, 0]


def prior_to_frame(prior: Tensor, resize: str, side: int) -> Tensor:
    """A prior over the original image ``[B, 1, H, W]`` -> over the square input frame ``[B, 1, side, side]``,
    following the encoder's resize rule (:class:`vmad.model.image_encoders.FrozenImageModule`); padding is
    filled with 0 (a typical patch). All-NaN rows (no prior) stay all NaN."""
    missing = torch.isnan(prior.flatten(1)).all(dim=1)
    framed = _to_frame(torch.nan_to_num(prior.float(), nan=0.0), resize, side)
    framed[missing] = float("nan")
    return framed


def _to_frame(prior: Tensor, resize: str, side: int) -> Tensor:
    height, width = prior.shape[-2:]
    if resize == "stretch":
        return F.interpolate(prior, size=(side, side), mode="bilinear", align_corners=False)
    if resize == "pad_square":
        square = max(height, width)
        top, left = (square - height) // 2, (square - width) // 2
        padded = F.pad(prior, (left, square - width - left, top, square - height - top))
        return F.interpolate(padded, size=(side, side), mode="bilinear", align_corners=False)
    scale = side / max(height, width)  # longest_side (SAM's rounding): resize, then pad bottom/right
    new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    resized = F.interpolate(prior, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (0, side - new_w, 0, side - new_h))
