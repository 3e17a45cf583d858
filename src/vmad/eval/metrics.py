"""Anomaly-detection metrics, exact and vectorised (paper Sec. V-A.3, Table I: AUROC, AP, PRO/AUPRO).

Conventions (all functions):

- Inputs are NumPy arrays or torch tensors. Labels/masks: non-zero = anomalous. Image-level inputs are
  flattened. Pixel-level inputs are an ``(N, H, W)`` array or a sequence of ``(H, W)`` arrays of any
  (differing) sizes; each map must have the shape of its mask.
- Higher score = more anomalous. Scores keep float32/float64; other dtypes are converted to float64. NaN
  scores raise ``ValueError``.
- A metric that is undefined for the input (only one class, no ground-truth region, a single usable
  threshold) returns ``nan`` and emits :class:`UndefinedMetricWarning`; it never raises.
- Ties: all pixels (images) with equal score cross a threshold together, as in scikit-learn and the MVTec AD
  reference code.

Definitions:

- AUROC: area under the ROC curve (trapezoidal, equal to the Mann-Whitney statistic with ties counted 1/2).
- AP: step-wise average precision, ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, as scikit-learn's
  ``average_precision_score`` (not the trapezoidal area under the PR curve).
- F1-max: the maximum over thresholds of ``2PR / (P + R)`` (the thresholds of the PR curve).
- AUPRO (:func:`aupro`): the MVTec AD reference definition (Bergmann et al., IJCV 2021,
  ``pro_curve_util.py``): connected ground-truth regions per map with 8-connectivity, every distinct score
  as a threshold, PRO = mean over all regions of the dataset of the fraction of the region at or above the
  threshold, FPR = fraction of all normal pixels at or above it; curve from (0, 0) to (1, 1), trapezoidal
  area up to ``fpr_limit`` with linear interpolation at the limit, divided by ``fpr_limit``.
- AUPRO-200 (:func:`aupro_200`): AnomalyCLIP's ``cal_pro_score``: thresholds
  ``np.arange(min, max, (max - min) / 200)`` over all maps, a pixel is positive when its score is ``> th``;
  PRO and FPR per threshold; keep ``fpr < limit``; min-max rescale the kept FPRs to [0, 1]; trapezoidal area
  of PRO over the rescaled FPR.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

ArrayLike = Any  # np.ndarray | torch.Tensor | sequence of those

_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given input (for example only one class is present); it returns NaN."""


def _undefined(metric: str, why: str) -> float:
    warnings.warn(f"{metric} is undefined: {why}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return math.nan


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _float_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    if dtypes and all(d == np.float32 for d in dtypes):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _scores(x: ArrayLike) -> np.ndarray:
    a = _to_numpy(x).ravel()
    a = a.astype(_float_dtype([a.dtype]), copy=False)
    if np.isnan(a).any():
        raise ValueError("scores contain NaN")
    return a


def _labels(x: ArrayLike) -> np.ndarray:
    return _to_numpy(x).ravel() != 0


def _map_list(x: ArrayLike, what: str) -> list[np.ndarray]:
    """An (N, H, W) array, an (H, W) array or a sequence of (H, W) arrays -> list of 2-D arrays."""
    if isinstance(x, (list, tuple)):
        items = [_to_numpy(a) for a in x]
    else:
        a = _to_numpy(x)
        if a.ndim == 2:
            items = [a]
        elif a.ndim == 3:
            items = list(a)
        elif a.ndim == 4 and a.shape[1] == 1:
            items = list(a[:, 0])
        else:
            raise ValueError(f"{what}: expected (N, H, W) or a list of (H, W) arrays, got shape {a.shape}")
    out = []
    for a in items:
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise ValueError(f"{what}: each map must be 2-D, got shape {a.shape}")
        out.append(a)
    return out


def _unique_counts(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending) and their counts, for an ascending array."""
    n = sorted_values.size
    if n == 0:
        return sorted_values[:0], np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1))
    counts = np.diff(np.append(starts, n))
    return sorted_values[starts], counts


def _count_ge(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")


def _strict_in_dtype(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Thresholds t' in ``dtype`` with ``s > t  <=>  s > t'`` for every ``s`` of that dtype (t' = t rounded
    down), so searching float32 scores does not cast them all to float64."""
    if thresholds.dtype == dtype:
        return thresholds
    low = thresholds.astype(dtype)
    up = low > thresholds
    low[up] = np.nextafter(low[up], dtype.type(-np.inf))
    return low


# ---------------------------------------------------------------------------------------------- curve core


def _auroc_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    """Exact AUROC = P(pos > neg) + P(pos == neg) / 2, from ascending arrays (integer arithmetic)."""
    vals, counts = _unique_counts(pos)
    lo = np.searchsorted(neg, vals, side="left")  # negatives strictly below
    hi = np.searchsorted(neg, vals, side="right")  # negatives at or below
    twice_u = int(np.sum(counts * (lo + hi)))  # 2 * (below + ties / 2)
    return twice_u / (2.0 * pos.size * neg.size)


def _pr_points(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct positive score v: (count of positives == v, TP(>= v), FP(>= v))."""
    vals, counts = _unique_counts(pos)
    tp = _count_ge(pos, vals)
    fp = _count_ge(neg, vals)
    return counts, tp, fp


def _ap_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    # Recall only rises at positive scores, so the step-wise sum runs over distinct positive scores.
    counts, tp, fp = _pr_points(neg, pos)
    return float(np.sum(counts / pos.size * (tp / (tp + fp))))


def _f1max_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    # For a fixed TP, F1 = 2TP / (TP + FP + P) falls as FP grows, so the maximum sits at a positive score.
    _, tp, fp = _pr_points(neg, pos)
    return float(np.max(2.0 * tp / (tp + fp + pos.size)))


def _binary_split(
    labels: np.ndarray, scores: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray] | None:
    if labels.shape != scores.shape:
        raise ValueError(f"{metric}: {labels.size} labels but {scores.size} scores")
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    if pos.size == 0 or neg.size == 0:
        return None
    return neg, pos


def _single_class(metric: str, labels: np.ndarray) -> float:
    kind = "anomalous" if labels.size and labels.all() else "normal"
    return _undefined(metric, f"only {kind} samples ({labels.size} in all)")


# ---------------------------------------------------------------------------------------------- image level


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (paper Table I "Img")."""
    y, s = _labels(labels), _scores(scores)
    split = _binary_split(y, s, "image_auroc")
    return _single_class("image_auroc", y) if split is None else _auroc_sorted(*split)


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level average precision, step-wise like scikit-learn (paper Table I "AP")."""
    y, s = _labels(labels), _scores(scores)
    split = _binary_split(y, s, "image_ap")
    return _single_class("image_ap", y) if split is None else _ap_sorted(*split)


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Maximum F1 over the thresholds of the precision-recall curve (inputs are flattened)."""
    y, s = _labels(labels), _scores(scores)
    split = _binary_split(y, s, "f1_max")
    return _single_class("f1_max", y) if split is None else _f1max_sorted(*split)


# ---------------------------------------------------------------------------------------------- pixel level


@dataclass
class PixelScores:
    """Pixel scores split by ground truth and sorted once, shared by every pixel metric.

    ``neg``: ascending scores of normal pixels. ``pos``: ascending scores of anomalous pixels, ``pos_weight``:
    1 / (area of the pixel's 8-connected region) in the same order, ``n_regions``: regions over all maps.
    """

    neg: np.ndarray
    pos: np.ndarray
    pos_weight: np.ndarray
    n_regions: int
    _suffix: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(cls, masks: ArrayLike, maps: ArrayLike) -> PixelScores:
        mask_list, map_list = _map_list(masks, "masks"), _map_list(maps, "maps")
        if len(mask_list) != len(map_list):
            raise ValueError(f"{len(mask_list)} masks but {len(map_list)} maps")
        dtype = _float_dtype([m.dtype for m in map_list])
        bool_masks = []
        for i, (mask, amap) in enumerate(zip(mask_list, map_list, strict=True)):
            if mask.shape != amap.shape:
                raise ValueError(f"map {i} has shape {amap.shape} but its mask has shape {mask.shape}")
            bool_masks.append(mask != 0)
        n_pos = sum(int(np.count_nonzero(m)) for m in bool_masks)
        n_neg = sum(m.size for m in bool_masks) - n_pos
        # Filled in place: one copy of the scores in all (no per-image pieces to concatenate).
        neg, pos, weight = np.empty(n_neg, dtype), np.empty(n_pos, dtype), np.empty(n_pos)
        i_neg = i_pos = n_regions = 0
        for m, amap in zip(bool_masks, map_list, strict=True):
            a = amap.astype(dtype, copy=False).ravel()
            k = m.size - int(np.count_nonzero(m))
            np.compress(~m.ravel(), a, out=neg[i_neg : i_neg + k])
            i_neg += k
            if k < m.size:
                regions, n = ndimage.label(m, structure=_STRUCTURE_8)
                area = np.bincount(regions.ravel())
                np.compress(m.ravel(), a, out=pos[i_pos : i_pos + m.size - k])
                weight[i_pos : i_pos + m.size - k] = 1.0 / area[regions[m]]
                i_pos += m.size - k
                n_regions += n
        neg.sort()
        order = np.argsort(pos, kind="stable")
        pos, weight = pos[order], weight[order]
        if (neg.size and np.isnan(neg[-1])) or (pos.size and np.isnan(pos[-1])):  # NaN sorts last
            raise ValueError("maps contain NaN")
        return cls(neg=neg, pos=pos, pos_weight=weight, n_regions=n_regions)

    def _check(self) -> str | None:
        if self.pos.size == 0:
            return "no anomalous pixel (all masks are blank)"
        if self.neg.size == 0:
            return "no normal pixel"
        return None

    def auroc(self) -> float:
        why = self._check()
        return _undefined("pixel_auroc", why) if why else _auroc_sorted(self.neg, self.pos)

    def ap(self) -> float:
        why = self._check()
        return _undefined("pixel_ap", why) if why else _ap_sorted(self.neg, self.pos)

    def f1_max(self) -> float:
        why = self._check()
        return _undefined("f1_max", why) if why else _f1max_sorted(self.neg, self.pos)

    def _region_weight_above(self, thresholds: np.ndarray, side: str) -> np.ndarray:
        """Sum of region weights of anomalous pixels with score >= t (side="left") or > t (side="right")."""
        if self._suffix is None:
            self._suffix = np.concatenate((np.cumsum(self.pos_weight[::-1])[::-1], [0.0]))
        return self._suffix[np.searchsorted(self.pos, thresholds, side=side)]

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Exact MVTec AD AUPRO. The curve's only non-vertical segments are, for each distinct normal score v,
        from (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)); vertical ones add no area."""
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        why = self._check()  # anomalous pixels exist => so does a region (n_regions >= 1)
        if why:
            return _undefined("aupro", why)
        n_neg = self.neg.size
        # Only normal scores in the top fpr_limit (plus one distinct value) matter: take that tail, with all
        # ties of its lowest value, so the per-value counts stay exact.
        start = self.neg.size - min(n_neg, int(fpr_limit * n_neg) + 2)
        start = int(np.searchsorted(self.neg, self.neg[start], side="left"))
        vals, counts = _unique_counts(self.neg[start:])
        vals, counts = vals[::-1], counts[::-1]  # descending thresholds -> FPR increasing
        n_ge = np.cumsum(counts)
        x = n_ge / n_neg
        x_prev = (n_ge - counts) / n_neg
        keep = x_prev <= fpr_limit  # segments that start inside the integration range
        vals, x, x_prev = vals[keep], x[keep], x_prev[keep]
        y = np.minimum(self._region_weight_above(vals, "left") / self.n_regions, 1.0)
        y_prev = np.minimum(self._region_weight_above(vals, "right") / self.n_regions, 1.0)
        x = np.minimum(x, 1.0)
        full = x <= fpr_limit
        area = float(np.sum(0.5 * (y[full] + y_prev[full]) * (x[full] - x_prev[full])))
        cross = ~full
        if cross.any():  # at most one segment crosses the limit: interpolate on it (reference `trapezoid`)
            x0, x1, y0, y1 = x_prev[cross][0], x[cross][0], y_prev[cross][0], y[cross][0]
            y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
        return area / fpr_limit

    def aupro_200(self, fpr_limit: float = 0.3, max_step: int = 200) -> float:
        """AnomalyCLIP's ``cal_pro_score``, computed from the sorted scores instead of a loop."""
        why = self._check()
        if why:
            return _undefined("aupro_200", why)
        min_th = min(self.neg[0], self.pos[0])
        max_th = max(self.neg[-1], self.pos[-1])
        delta = (max_th - min_th) / max_step
        if not delta > 0:
            return _undefined("aupro_200", "the maps are constant (no threshold range)")
        ths = _strict_in_dtype(np.arange(min_th, max_th, delta), self.neg.dtype)
        fp = self.neg.size - np.searchsorted(self.neg, ths, side="right")  # normal pixels > th
        fprs = fp / self.neg.size
        pros = self._region_weight_above(ths, "right") / self.n_regions
        idx = fprs < fpr_limit
        fprs, pros = fprs[idx], pros[idx]
        if fprs.size < 2 or fprs.max() == fprs.min():
            return _undefined("aupro_200", f"fewer than two distinct FPRs below {fpr_limit}")
        fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
        # FPR falls as the threshold rises: the area is -trapz in threshold order (sklearn.metrics.auc).
        return float(-np.sum(0.5 * (pros[1:] + pros[:-1]) * np.diff(fprs)))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC over all pixels of all maps (paper Table I "Pixel")."""
    return PixelScores.build(masks, maps).auroc()


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level step-wise average precision over all pixels of all maps."""
    return PixelScores.build(masks, maps).ap()


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO, MVTec AD reference definition (paper Table I "PRO"); see the module docstring."""
    return PixelScores.build(masks, maps).aupro(fpr_limit)


def aupro_200(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """AUPRO with 200 evenly spaced thresholds (AnomalyCLIP's ``cal_pro_score``); see the module docstring."""
    return PixelScores.build(masks, maps).aupro_200(fpr_limit)


def pixel_metrics(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> dict[str, float]:
    """Every pixel metric from one sort: pixel_auroc, pixel_ap, aupro, aupro_200, f1_max_pixel."""
    ps = PixelScores.build(masks, maps)
    return {
        "pixel_auroc": ps.auroc(),
        "pixel_ap": ps.ap(),
        "aupro": ps.aupro(fpr_limit),
        "aupro_200": ps.aupro_200(fpr_limit),
        "f1_max_pixel": ps.f1_max(),
    }


def image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """image_auroc, image_ap and f1_max_image."""
    return {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "f1_max_image": f1_max(labels, scores),
    }


# ---------------------------------------------------------------------------------------------- thresholds

#: The false-positive rate on normals of the "at_fpr" thresholds ``vmad eval`` stores (OURS: 5 %).
THRESHOLD_FPR = 0.05
THRESHOLD_RULE = (
    "a sample (image or pixel) is anomalous when its score is > threshold. f1_max: the threshold at which F1 "
    "is maximal on these data (midway between the lowest score counted anomalous and the next lower score); "
    "at_fpr: the lowest threshold with at most fpr of the normal samples above it (the normal score ranked "
    "floor(fpr * n_normal) + 1 from the top); pixel thresholds apply to the evaluated maps (resized to the "
    "mask and smoothed), image thresholds to the image scores"
)


def _f1_max_threshold_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    """The threshold t with ``score > t`` reproducing F1-max: midway between the lowest positive score v of
    the best ``score >= v`` split and the next lower score (just below v when there is none)."""
    _, tp, fp = _pr_points(neg, pos)
    vals = _unique_counts(pos)[0]
    best = vals[int(np.argmax(2.0 * tp / (tp + fp + pos.size)))]
    below_neg = neg[neg < best]
    below_pos = pos[pos < best]
    lower = max(float(below_neg[-1]) if below_neg.size else -np.inf,
                float(below_pos[-1]) if below_pos.size else -np.inf)
    if not np.isfinite(lower):
        return float(np.nextafter(best, -np.inf))
    mid = lower + (float(best) - lower) / 2.0
    return mid if lower < mid < best else lower


def _fpr_threshold_sorted(neg: np.ndarray, fpr: float) -> float:
    """The lowest t with at most ``fpr`` of ``neg`` (ascending) strictly above it: the score ranked
    ``floor(fpr * n) + 1`` from the top (ties there only lower the rate)."""
    k = int(math.floor(fpr * neg.size + 1e-9))
    return float(neg[neg.size - 1 - min(k, neg.size - 1)])


def _check_fpr(fpr: float) -> None:
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")


def f1_max_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The threshold t such that ``score > t`` gives F1-max on these data (NaN when only one class is
    present; no warning: :func:`f1_max` gives it)."""
    y, s = _labels(labels), _scores(scores)
    split = _binary_split(y, s, "f1_max_threshold")
    return math.nan if split is None else _f1_max_threshold_sorted(*split)


def fpr_threshold(labels: ArrayLike, scores: ArrayLike, fpr: float = THRESHOLD_FPR) -> float:
    """The lowest t with at most ``fpr`` of the normal samples (label 0) scoring ``> t`` (NaN without
    normal samples)."""
    _check_fpr(fpr)
    y, s = _labels(labels), _scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"fpr_threshold: {y.size} labels but {s.size} scores")
    neg = np.sort(s[~y])
    return math.nan if neg.size == 0 else _fpr_threshold_sorted(neg, fpr)


def image_thresholds(labels: ArrayLike, scores: ArrayLike, fpr: float = THRESHOLD_FPR) -> dict[str, float]:
    """``{"f1_max": ..., "at_fpr": ...}`` of the image scores (see :data:`THRESHOLD_RULE`)."""
    return {"f1_max": f1_max_threshold(labels, scores), "at_fpr": fpr_threshold(labels, scores, fpr)}


def pixel_thresholds(ps: PixelScores, fpr: float = THRESHOLD_FPR) -> dict[str, float]:
    """``{"f1_max": ..., "at_fpr": ...}`` of the pixel scores (NaN where undefined)."""
    _check_fpr(fpr)
    f1 = math.nan if ps._check() else _f1_max_threshold_sorted(ps.neg, ps.pos)
    at = math.nan if ps.neg.size == 0 else _fpr_threshold_sorted(ps.neg, fpr)
    return {"f1_max": f1, "at_fpr": at}


def class_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    threshold_fpr: float = THRESHOLD_FPR,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Every image and pixel metric (one sort of the pixels) and the thresholds ``vmad eval`` stores:
    ``{"rule", "fpr", "image": {"f1_max", "at_fpr"}, "pixel": {"f1_max", "at_fpr"}}``."""
    values = image_metrics(labels, scores)
    ps = PixelScores.build(masks, maps)
    values.update({
        "pixel_auroc": ps.auroc(),
        "pixel_ap": ps.ap(),
        "aupro": ps.aupro(fpr_limit),
        "aupro_200": ps.aupro_200(fpr_limit),
        "f1_max_pixel": ps.f1_max(),
    })
    thresholds = {
        "rule": THRESHOLD_RULE,
        "fpr": threshold_fpr,
        "image": image_thresholds(labels, scores, threshold_fpr),
        "pixel": pixel_thresholds(ps, threshold_fpr),
    }
    return values, thresholds
