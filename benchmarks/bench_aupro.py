"""Benchmark exact AUPRO (vmad.eval.metrics.aupro) on N maps of S x S pixels.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_aupro.py [--n 500] [--size 512] [--seed 0]
       add --reference to also run a port of the official MVTec AD compute_pro + trapezoid (full argsort,
       about 4 GB of memory) and compare its value.
Prints the machine, the date and the seconds for aupro alone and for every pixel metric from one sort.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

from vmad.eval.metrics import aupro, pixel_metrics


def synthetic(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half the maps carry 1-3 elliptic defects; scores = uniform noise + 0.6 inside defects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(5, size // 6, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = rng.random((n, size, size), dtype=np.float32)
    maps += 0.6 * masks
    return masks, maps


def mvtec_reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Port of the official MVTec AD evaluation code (pro_curve_util.compute_pro, generic_util.trapezoid)."""
    from bisect import bisect

    from scipy.ndimage import label

    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels, num_gt_regions = 0, 0
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    for gt_ind, gt_map in enumerate(masks):
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_changes[gt_ind, ok_mask] = 1
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_changes[gt_ind, region_mask] = 1.0 / np.sum(region_mask)
    scores = maps.ravel().copy()
    fp_flat, pro_flat = fp_changes.ravel(), pro_changes.ravel()
    sort_idxs = np.argsort(scores).astype(np.uint32)[::-1]
    np.take(scores, sort_idxs, out=scores)
    np.take(fp_flat, sort_idxs, out=fp_flat)
    np.take(pro_flat, sort_idxs, out=pro_flat)
    del sort_idxs
    np.cumsum(fp_flat, out=fp_flat)
    fprs = fp_flat.astype(np.float32, copy=False) / num_ok_pixels
    np.cumsum(pro_flat, out=pro_flat)
    pros = pro_flat / num_gt_regions
    keep = np.append(np.diff(scores) != 0, np.True_)
    fprs, pros = np.clip(fprs[keep], None, 1.0), np.clip(pros[keep], None, 1.0)
    x = np.concatenate(([0.0], fprs, [1.0]))
    y = np.concatenate(([0.0], pros, [1.0]))
    correction = 0.0
    if limit not in x:
        ins = bisect(x, limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (limit - x[ins - 1])
    m = x <= limit
    x, y = x[m], y[m]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / limit


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", action="store_true", help="also run the official MVTec AD code (slow)")
    args = ap.parse_args()
    masks, maps = synthetic(args.n, args.size, args.seed)
    print(f"date {datetime.date.today().isoformat()}  machine {cpu_name()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.n} maps of {args.size}x{args.size} ({maps.size / 1e6:.0f} M pixels, "
          f"{masks.mean() * 100:.2f} % anomalous)")
    t = time.perf_counter()
    value = aupro(masks, maps)
    t_aupro = time.perf_counter() - t
    print(f"aupro = {value:.6f}  in {t_aupro:.2f} s")
    t = time.perf_counter()
    allm = pixel_metrics(masks, maps)
    t_all = time.perf_counter() - t
    print("pixel_metrics = " + ", ".join(f"{k} {v:.6f}" for k, v in allm.items()) + f"  in {t_all:.2f} s")
    if args.reference:
        t = time.perf_counter()
        ref = mvtec_reference_aupro(masks, maps)
        t_ref = time.perf_counter() - t
        print(f"MVTec AD reference code: aupro = {ref:.6f} in {t_ref:.2f} s; "
              f"|difference| = {abs(ref - value):.2e}")


if __name__ == "__main__":
    main()
