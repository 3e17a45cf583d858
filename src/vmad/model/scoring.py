"""Image-level anomaly score from the mask probability map (OURS, Table I's image AUROC; ``model.score``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vmad.model.config import ScoreConfig
from vmad.model.prior_prompt import PRIOR_CLIP


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


#: a prior maximum of this many standard units neither raises nor lowers the image score (OURS)
PRIOR_NEUTRAL = 3.0


def image_scores(probs: Tensor, cfg: ScoreConfig, priors: Tensor | None = None) -> Tensor:
    """Image-level score from ``[B, H, W]`` mask probabilities by ``cfg.rule`` (OURS, see ScoreConfig);
    with ``priors`` (``[B, 1, h, w]`` standard units, all-NaN rows = none) and ``cfg.prior_weight`` > 0, each
    prior's maximum (clipped as the prior prompt clips it) shifts the score's logit (float64, so scores near 1
    keep their order)."""
    scores = _mask_scores(probs, cfg)
    if priors is None or cfg.prior_weight == 0:
        return scores
    flat = priors.flatten(1).double()
    present = ~torch.isnan(flat).all(1)
    peak = torch.nan_to_num(flat, nan=float("-inf")).amax(1).clamp(*PRIOR_CLIP)
    p = scores.double().clamp(1e-12, 1 - 1e-12)
    shifted = torch.sigmoid(torch.logit(p) + cfg.prior_weight * (peak - PRIOR_NEUTRAL))
    return torch.where(present.to(shifted.device), shifted, scores.double())


def _mask_scores(probs: Tensor, cfg: ScoreConfig) -> Tensor:
    if cfg.rule == "max":
        return probs.flatten(1).amax(1)
    if cfg.rule == "mean_topk":
        flat = probs.flatten(1)
        k = max(1, int(round(cfg.topk_ratio * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    return gaussian_blur(probs.float(), cfg.sigma).flatten(1).amax(1)
