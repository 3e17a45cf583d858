"""Binary masks of a late-fusion prior model on a data set: pooled pixel F1, the share of normal images whose
mask covers under 1 %, and the defect images' IoU, for the mask at fused logit > T (T = W x K: the skip offset
K of ``vmad model add-prior --skip-offset``). Chooses K for issue 14 (benchmarks/results/
prior_weights_heldout.md, run 3). Each class's images are detected together (folder mode); a set with splits
is read from its test split; ``--prior`` chooses how priors are made (``self``: each image alone).

    python benchmarks/prior_mask_offset.py --data DIR --model MODEL --thresholds 0 8 16 24 32 40 48 52 56 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mask_iou import detect_set  # benchmarks/mask_iou.py

from vmad.infer.detector import PRIOR_USES, Detector, DetectorConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder-format set (images/ and masks/ per class)")
    ap.add_argument("--model", required=True, help="a model with a normality prior and score space logit")
    ap.add_argument("--thresholds", type=float, nargs="+", required=True, help="fused-logit thresholds T")
    ap.add_argument("--prior", choices=PRIOR_USES, default="folder",
                    help="DetectorConfig.prior (default folder; self = each image alone with its self prior)")
    args = ap.parse_args()
    detector = Detector.from_pretrained(args.model, config=DetectorConfig(prior=args.prior))
    if detector.model.config.score.space != "logit":
        raise SystemExit(f"{args.model}: needs model.score.space logit (the maps' log-odds)")
    maps = [(d.full_logit_map(), gt) for d, gt, _ in detect_set(detector, Path(args.data))]
    print(f"{args.model} on {args.data}, prior {args.prior}: {len(maps)} images")
    print("| T | pooled pixel F1 | normal images, mask < 1 % | defect images, mean IoU | IoU >= 0.3 |")
    print("|---:|---:|---:|---:|---:|")
    for t in args.thresholds:
        tp = fp = fn = 0
        small, ious = [], []
        for logits, gt in maps:
            m = logits > t
            tp += int((m & gt).sum())
            fp += int((m & ~gt).sum())
            fn += int((~m & gt).sum())
            if gt.any():
                ious.append((m & gt).sum() / (m | gt).sum())
            else:
                small.append(m.mean() < 0.01)
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        hit = float(np.mean(np.array(ious) >= 0.3))
        print(f"| {t:g} | {f1:.3f} | {np.mean(small):.2f} | {np.mean(ious):.3f} | {hit:.2f} |")


if __name__ == "__main__":
    main()
