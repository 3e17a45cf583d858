"""vmad.eval.metrics against independent references: scikit-learn, a slow threshold-by-threshold MVTec AUPRO,
a literal port of AnomalyCLIP's cal_pro_score, and inputs whose answers are worked out by hand."""

from __future__ import annotations

import math
import warnings
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from vmad.eval import metrics as M

STRUCT8 = np.ones((3, 3), dtype=int)


# ------------------------------------------------------------------------------------------ slow references


def ref_trapezoid(x, y, x_max):
    """Literal port of the MVTec AD reference `trapezoid` (pro_curve_util / generic_util)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def ref_aupro(masks, maps, limit=0.3):
    """One full pass over the pixels per distinct threshold, regions from scipy.ndimage.label (3x3)."""
    n_normal = sum(int((m == 0).sum()) for m in masks)
    per_image_regions = []
    for m in masks:
        lab, n = ndimage.label(m != 0, structure=STRUCT8)
        per_image_regions.append([lab == k for k in range(1, n + 1)])
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fp, overlaps = 0, []
        for m, a, regs in zip(masks, maps, per_image_regions, strict=True):
            b = a >= t
            fp += int(np.logical_and(b, m == 0).sum())
            overlaps += [b[r].sum() / r.sum() for r in regs]
        fprs.append(fp / n_normal)
        pros.append(float(np.mean(overlaps)))
    fprs.append(1.0)
    pros.append(1.0)
    return ref_trapezoid(fprs, pros, limit) / limit


def ref_cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    """AnomalyCLIP's cal_pro_score (skimage label/regionprops -> scipy 8-connected label), on lists."""
    min_th = min(a.min() for a in amaps)
    max_th = max(a.max() for a in amaps)
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps = [np.zeros_like(a, dtype=bool) for a in amaps]
        for b, a in zip(binary_amaps, amaps, strict=True):
            b[a <= th], b[a > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            lab, n = ndimage.label(mask, structure=STRUCT8)
            for k in range(1, n + 1):
                coords = np.argwhere(lab == k)
                tp_pixels = binary_amap[coords[:, 0], coords[:, 1]].sum()
                pro.append(tp_pixels / len(coords))
        fp_pixels = sum(np.logical_and(1 - m, b).sum() for m, b in zip(masks, binary_amaps, strict=True))
        fpr = fp_pixels / sum((1 - m).sum() for m in masks)
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs = np.array(pros), np.array(fprs)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


def ref_f1_max(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


# ------------------------------------------------------------------------------------------ random data


def blob_masks(rng, shapes, p_region=0.7):
    masks = []
    for h, w in shapes:
        m = np.zeros((h, w), np.uint8)
        if rng.random() < p_region:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
            m[rng.random((h, w)) < 0.02] = 1  # single pixels, some diagonal neighbours
        masks.append(m)
    return masks


def noisy_maps(rng, masks, quantize=None, dtype=np.float32):
    maps = []
    for m in masks:
        a = rng.random(m.shape) + 0.8 * m
        if quantize:
            a = np.round(a * quantize) / quantize
        maps.append(a.astype(dtype))
    return maps


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + labels
    if seed % 2:
        scores = np.round(scores * 2) / 2  # many ties
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert M.image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert M.f1_max(labels, scores) == pytest.approx(ref_f1_max(labels, scores), abs=1e-6)


def test_image_metrics_by_hand_and_torch():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert M.image_auroc(labels, scores) == pytest.approx(0.75)
    assert M.image_ap(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert M.f1_max(labels, scores) == pytest.approx(0.8)
    assert M.image_auroc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(0.75)
    assert M.image_auroc([0, 1, 1], [0.5, 0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_pixel_metrics_match_references(seed):
    rng = np.random.default_rng(100 + seed)
    shapes = [(int(rng.integers(6, 14)), int(rng.integers(6, 14))) for _ in range(4)]
    masks = blob_masks(rng, shapes)
    masks[0][2:4, 2:5] = 1  # at least one region
    dtype = np.float32 if seed < 3 else np.float64
    maps = noisy_maps(rng, masks, quantize=20 if seed % 2 else None, dtype=dtype)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    got = M.pixel_metrics(masks, maps)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert got["f1_max_pixel"] == pytest.approx(ref_f1_max(y, s), abs=1e-6)
    assert got["aupro"] == pytest.approx(ref_aupro(masks, maps), abs=1e-6)
    assert got["aupro_200"] == pytest.approx(ref_cal_pro_score(masks, maps), abs=1e-6)
    for limit in (0.05, 0.3, 1.0):
        assert M.aupro(masks, maps, limit) == pytest.approx(ref_aupro(masks, maps, limit), abs=1e-6)
    assert M.pixel_auroc(masks, maps) == got["pixel_auroc"]
    assert M.aupro_200(masks, maps) == got["aupro_200"]


def test_aupro_200_strict_threshold_on_exact_hits():
    # Integer maps 0..200: every threshold of np.arange(0, 200, 1.0) equals some pixel scores, so ">" vs ">="
    # matters; the reference counts a pixel as positive only when its score is strictly above the threshold.
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, [(12, 12)] * 3, p_region=1.0)
    maps = [np.clip(rng.integers(0, 120, m.shape) + 80 * m, 0, 200) for m in masks]
    maps[0][0, 0], maps[1][0, 0] = 0, 200
    assert M.aupro_200(masks, maps) == pytest.approx(ref_cal_pro_score(masks, maps), abs=1e-6)
    assert M.aupro(masks, maps) == pytest.approx(ref_aupro(masks, maps), abs=1e-6)
    # float32 maps on a 1/8 grid: the float64 thresholds k/8 hit float32 scores exactly.
    maps32 = [(a / 8).astype(np.float32) for a in maps]
    assert M.aupro_200(masks, maps32) == pytest.approx(ref_cal_pro_score(masks, maps32), abs=1e-6)
    # float32 scores equal to float64 thresholds rounded to float32 (above or below them): the threshold must
    # not be rounded to float32 naively.
    lo, hi = np.float32(0.0), np.float32(20.0)
    ths = np.arange(lo, hi, (hi - lo) / 200)
    near = ths.astype(np.float32)
    maps_near = [rng.choice(near, size=m.shape) + np.float32(5.0) * m for m in masks]
    maps_near[0][0, 0], maps_near[1][0, 0] = lo, hi
    assert (near > ths).sum() > 20 and (near < ths).sum() > 20
    assert M.aupro_200(masks, maps_near) == pytest.approx(ref_cal_pro_score(masks, maps_near), abs=1e-6)


def test_pixel_metrics_accept_stacked_arrays_and_tensors():
    rng = np.random.default_rng(7)
    masks = np.stack(blob_masks(rng, [(10, 12)] * 3, p_region=1.0))
    maps = np.stack(noisy_maps(rng, list(masks)))
    expected = ref_aupro(list(masks), list(maps))
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-6)
    got = M.aupro(torch.from_numpy(masks.astype(bool)), torch.from_numpy(maps))
    assert got == pytest.approx(expected, abs=1e-6)
    assert M.aupro(masks[:, None], maps[:, None]) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------ by hand


def test_aupro_perfect_and_constant():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    assert M.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    # One threshold: the curve is (0,0) -> (1,1); area up to 0.3 is 0.045, divided by 0.3 = 0.15.
    assert M.aupro([mask], [np.full((8, 8), 0.7)]) == pytest.approx(0.15)


def test_aupro_two_regions_by_hand():
    # Row: A | n | B B | n n n n. Region A (1 px) 0.9, region B (2 px) 0.8 and 0.1, normals 0.7 .. 0.3.
    mask = np.array([[1, 0, 1, 1, 0, 0, 0, 0]])
    amap = np.array([[0.9, 0.7, 0.8, 0.1, 0.6, 0.5, 0.4, 0.3]])
    # PRO is 0.5 at t=0.9, 0.75 at t=0.8 (FPR still 0) and stays 0.75 until FPR = 1: area 0.3 * 0.75.
    assert M.aupro(mask, amap) == pytest.approx(0.75)


def test_aupro_uses_8_connectivity():
    # (0,0) touches (1,1) diagonally: one region of 3 px (8-conn.), PRO at t=1 is 2/3 (4-conn.: 0.75).
    mask = np.array([[1, 0, 0], [0, 1, 1]])
    amap = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0]])
    assert M.aupro(mask, amap) == pytest.approx(2 / 3)


def test_aupro_ties_move_together():
    # The anomalous pixel ties with a normal one: the first point is (1/3, 1), interpolated at 0.3 to 0.9.
    mask = np.array([[1, 0, 0, 0]])
    amap = np.array([[0.5, 0.5, 0.2, 0.1]])
    assert M.aupro(mask, amap) == pytest.approx(0.5 * 0.3 * 0.9 / 0.3)


def test_region_mean_not_pixel_fraction():
    # Two maps of different sizes; regions A (1 px, 1.0) and B (3 px, 0.25); normals: one 0.5, nine 0.
    masks = [np.array([[1, 0, 1, 1, 1]]), np.zeros((1, 9), int)]
    maps = [np.array([[1.0, 0.0, 0.25, 0.25, 0.25]]), np.array([[0.5] + [0.0] * 8])]
    # MVTec: (0,0) (0,.5) (.1,.5) (.1,1) (1,1): area 0.1*0.5 + 0.2*1 = 0.25 over 0.3.
    assert M.aupro(masks, maps) == pytest.approx(0.25 / 0.3)
    # 200 thresholds: FPR 0.1 below th=0.5 (rescaled to 1), 0 above; PRO 0.5 on the only sloped segment.
    assert M.aupro_200(masks, maps) == pytest.approx(0.5)
    assert M.aupro_200(masks, maps) == pytest.approx(ref_cal_pro_score(masks, maps), abs=1e-9)


def test_pixel_auroc_by_hand():
    mask = np.array([[1, 0], [0, 1]])
    amap = np.array([[0.9, 0.9], [0.1, 0.5]])
    # pairs (pos, neg): (.9,.9) tie 1/2, (.9,.1) 1, (.5,.9) 0, (.5,.1) 1 -> 2.5 / 4
    assert M.pixel_auroc(mask, amap) == pytest.approx(0.625)


# ------------------------------------------------------------------------------------------ degenerate


@pytest.mark.parametrize("fn", [M.image_auroc, M.image_ap, M.f1_max])
def test_single_class_gives_nan_with_warning(fn):
    with pytest.warns(M.UndefinedMetricWarning, match="only normal"):
        assert math.isnan(fn([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.warns(M.UndefinedMetricWarning, match="only anomalous"):
        assert math.isnan(fn([1, 1], [0.1, 0.2]))


def test_blank_masks_and_constant_maps():
    blank = np.zeros((3, 5, 5), np.uint8)
    maps = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    with pytest.warns(M.UndefinedMetricWarning):
        out = M.pixel_metrics(blank, maps)
    assert all(math.isnan(v) for v in out.values())
    masks = blank.copy()
    masks[1, 1:3, 1:3] = 1
    masks[2] = 1  # a fully anomalous map next to partly anomalous and blank ones
    const = np.full((3, 5, 5), 0.25, np.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = M.pixel_metrics(masks, const)
    assert out["pixel_auroc"] == pytest.approx(0.5)
    assert out["aupro"] == pytest.approx(0.15)
    assert math.isnan(out["aupro_200"])  # cal_pro_score has no threshold range on a constant map
    assert [str(w.message) for w in rec] == [
        "aupro_200 is undefined: the maps are constant (no threshold range); returning NaN"
    ]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        M.aupro([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro([np.eye(4)], [np.eye(4)], fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_threshold_reproduces_f1_max(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    labels[:2] = [True, False]
    scores = rng.normal(size=60) + labels
    if seed % 2:
        scores = np.round(scores * 2) / 2  # ties
    t = M.f1_max_threshold(labels, scores)
    pred = scores > t
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(M.f1_max(labels, scores))
    assert not np.any(scores == t)  # strictly between two scores (never on one)


def test_thresholds_by_hand():
    labels, scores = [0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.35, 0.9]
    assert M.f1_max_threshold(labels, scores) == pytest.approx(0.325)  # {0.35, 0.4, 0.9}: F1 0.8
    assert M.fpr_threshold(labels, scores, 0.0) == pytest.approx(0.4)  # max normal
    assert M.fpr_threshold(labels, scores, 0.25) == pytest.approx(0.3)  # one normal of four above
    assert M.fpr_threshold(labels, scores, 0.2) == pytest.approx(0.4)  # floor(0.8) = 0 above
    assert math.isnan(M.f1_max_threshold([0, 0], [0.1, 0.2]))
    assert math.isnan(M.fpr_threshold([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="fpr"):
        M.fpr_threshold(labels, scores, 1.0)


def test_class_metrics_equal_the_separate_metrics_and_give_pixel_thresholds():
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, [(12, 10)] * 4, p_region=1.0)
    maps = noisy_maps(rng, masks)
    labels = [int(m.any()) for m in masks]
    labels[0] = 0
    scores = [float(a.max()) for a in maps]
    values, thr = M.class_metrics(labels, scores, masks, maps, 0.3, threshold_fpr=0.1)
    assert values == {**M.image_metrics(labels, scores), **M.pixel_metrics(masks, maps, 0.3)}
    y = np.concatenate([m.ravel() for m in masks]) != 0
    s = np.concatenate([a.ravel() for a in maps])
    assert thr["fpr"] == 0.1 and "> threshold" in thr["rule"]
    assert thr["pixel"]["f1_max"] == pytest.approx(M.f1_max_threshold(y, s))
    assert thr["pixel"]["at_fpr"] == pytest.approx(M.fpr_threshold(y, s, 0.1))
    assert (s[~y] > thr["pixel"]["at_fpr"]).mean() <= 0.1
    assert thr["image"] == M.image_thresholds(labels, scores, 0.1)
