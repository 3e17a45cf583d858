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


def image_scores(probs: Tensor, cfg: ScoreConfig, priors: Tensor | None = None,
                 logits: Tensor | None = None) -> Tensor:
    """Image-level score from ``[B, H, W]`` mask probabilities by ``cfg.rule`` (OURS, see ScoreConfig);
    with ``priors`` (``[B, 1, h, w]`` standard units, all-NaN rows = none) and ``cfg.prior_weight`` > 0, each
    prior's maximum (clipped as the prior prompt clips it) shifts the score's logit (float64, so scores near 1
    keep their order). With ``cfg.space == "logit"``: the sigmoid of :func:`score_logits`."""
    if cfg.space == "logit":
        return torch.sigmoid(score_logits(probs, cfg, priors, logits))
    scores = _mask_scores(probs, cfg)
    if priors is None or cfg.prior_weight == 0:
        return scores
    p = scores.double().clamp(1e-12, 1 - 1e-12)
    shifted = torch.sigmoid(torch.logit(p) + _prior_shift(priors, cfg).to(p.device))
    return torch.where(_has_prior(priors).to(p.device), shifted, scores.double())


def score_logits(probs: Tensor, cfg: ScoreConfig, priors: Tensor | None = None,
                 logits: Tensor | None = None) -> Tensor:
    """The image scores' log-odds (float64 ``[B]``). ``cfg.space == "logit"`` (OURS): ``cfg.rule`` applied
    to the mask ``logits`` themselves (default: the logit of ``probs``), plus the prior shift; they do not
    saturate where the probabilities reach 1. Otherwise the logit of :func:`image_scores` (clamped)."""
    if cfg.space != "logit":
        return torch.logit(image_scores(probs, cfg, priors).double().clamp(1e-12, 1 - 1e-12))
    x = logits if logits is not None else torch.logit(probs.double().clamp(1e-12, 1 - 1e-12))
    z = _mask_scores(x.float(), cfg).double()
    if priors is None or cfg.prior_weight == 0:
        return z
    return torch.where(_has_prior(priors).to(z.device), z + _prior_shift(priors, cfg).to(z.device), z)


def _has_prior(priors: Tensor) -> Tensor:
    return ~torch.isnan(priors.flatten(1)).all(1)  # all-NaN rows: no prior


def _prior_shift(priors: Tensor, cfg: ScoreConfig) -> Tensor:
    """``prior_weight * (max(prior) - PRIOR_NEUTRAL)`` per image (float64; the maximum clipped as the prior
    prompt clips it)."""
    flat = priors.flatten(1).double()
    peak = torch.nan_to_num(flat, nan=float("-inf")).amax(1).clamp(*PRIOR_CLIP)
    return cfg.prior_weight * (peak - PRIOR_NEUTRAL)


def _mask_scores(probs: Tensor, cfg: ScoreConfig) -> Tensor:
    if cfg.rule == "max":
        return probs.flatten(1).amax(1)
    if cfg.rule == "mean_topk":
        flat = probs.flatten(1)
        k = max(1, int(round(cfg.topk_ratio * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    return gaussian_blur(probs.float(), cfg.sigma).flatten(1).amax(1)
