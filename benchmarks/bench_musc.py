"""MuSc on one MVTec-layout class without the evaluation engine: image/pixel AUROC (scikit-learn), time.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_musc.py [CLASS_DIR] [key=value ...]
(default CLASS_DIR: ../shared/data/mvtec_ad/bottle). Options are MuScConfig fields, e.g. image_size=320
block_indices=4,7,10 grid_stride=8. Pixel AUROC is computed at ``eval_size`` x ``eval_size`` (masks resized
nearest, maps bilinear); the engine (`vmad eval`) computes it at the mask resolution.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from vmad.baselines import build_baseline


def load_mvtec_class(root: Path) -> tuple[list[np.ndarray], np.ndarray, list[Path | None]]:
    images, labels, masks = [], [], []
    for defect_dir in sorted((root / "test").iterdir()):
        for img_path in sorted(defect_dir.glob("*.png")):
            images.append(np.asarray(Image.open(img_path).convert("RGB")))
            good = defect_dir.name == "good"
            labels.append(0 if good else 1)
            mask = root / "ground_truth" / defect_dir.name / f"{img_path.stem}_mask.png"
            masks.append(None if good else mask)
    return images, np.array(labels), masks


def main(argv: list[str]) -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
    root = Path(argv[0]) if argv and "=" not in argv[0] else default
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    eval_size = int(opts.pop("eval_size", "256"))
    images, labels, mask_paths = load_mvtec_class(root)
    scorer = build_baseline("musc", **opts)
    t0 = time.perf_counter()
    out = scorer.score(images, root.name)
    elapsed = time.perf_counter() - t0
    gt = np.zeros((len(images), eval_size, eval_size), dtype=np.uint8)
    for i, mp in enumerate(mask_paths):
        if mp is not None:
            m = Image.open(mp).convert("L").resize((eval_size, eval_size), Image.NEAREST)
            gt[i] = np.asarray(m) > 127
    maps = torch.from_numpy(out.anomaly_maps)[:, None]
    maps = F.interpolate(maps, size=(eval_size,) * 2, mode="bilinear", align_corners=False)[:, 0].numpy()
    print(f"class={root.name} n={len(images)} settings={scorer.settings()}")
    print(f"image_auroc={roc_auc_score(labels, out.image_scores):.4f} "
          f"pixel_auroc={roc_auc_score(gt.ravel(), maps.ravel()):.4f} (pixels at {eval_size}x{eval_size})")
    print(f"seconds={elapsed:.1f} s_per_image={elapsed / len(images):.3f} timing={scorer.timing} "
          f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main(sys.argv[1:])
