"""Binary masks as a user gets them (``vmad detect``'s mask at the model's threshold), per data set: the share
of normal images masked under 1 %, the defect images' mean IoU and the share with IoU >= 0.3, and the pooled
pixel AUROC of the maps; for a set built by ``benchmarks/make_heldout_textures.py`` also the mean IoU per
synthetic defect kind. Each class's images are detected together (folder mode; ``@PRIOR`` as in
``compare_small_musc.py``); ``,norefine`` runs a model with a mask refiner without it (OURS ablation).

    python benchmarks/mask_iou.py --vmad 'small=small' --vmad 'small, no refiner=small,norefine' \\
        --data HELDOUT examples --prior-of examples=folder+self --out benchmarks/results/mask_refiner.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _machine import write_report
from compare_small_musc import parse_vmad
from PIL import Image

from vmad.data.dataset import load_dataset
from vmad.data.io import read_image
from vmad.data.synth import SynthConfig
from vmad.eval.metrics import pixel_auroc
from vmad.infer.detection import Detection
from vmad.infer.detector import Detector, DetectorConfig


def heldout_kind(path: Path) -> str | None:
    """The synthetic kind of a make_heldout_textures image (odd crops, the kinds in turn), else None."""
    try:
        i = int(path.stem)
    except ValueError:
        return None
    kinds = SynthConfig().kinds
    return kinds[(i // 2) % len(kinds)] if i % 2 == 1 else None


def detect_set(detector: Detector, data: Path) -> Iterator[tuple[Detection, np.ndarray, Path]]:
    """(detection, ground-truth mask, image path) for every image of a folder-format set (its test split
    when it has splits), each class's images detected together (folder mode)."""
    ds = load_dataset(data)
    split = "test" if "test" in ds.splits() else None
    for name in ds.class_names():
        samples = ds.select(class_name=name, split=split)
        dets = detector.detect([read_image(s.image_path) for s in samples], answer=False)
        for s, d in zip(samples, dets, strict=True):
            gt = np.zeros(d.size, bool) if s.mask_path is None else (
                np.asarray(Image.open(s.mask_path).convert("L")) > 127)
            yield d, gt, Path(s.image_path)


def measure(detector: Detector, data: Path) -> dict:
    normal_small, ious, kinds, names = [], [], {}, []
    maps, masks = [], []
    for d, gt, path in detect_set(detector, data):
        lg = d.full_logit_map()
        maps.append(lg if lg is not None else d.full_probability_map())
        masks.append(gt)
        if not gt.any():
            normal_small.append(d.mask.mean() < 0.01)
            continue
        iou = float((d.mask & gt).sum() / (d.mask | gt).sum())
        ious.append(iou)
        names.append((path.stem, iou))
        kind = heldout_kind(path) if "heldout" in str(data) else None
        if kind is not None:
            kinds.setdefault(kind, []).append(iou)
    return {"n": len(maps), "normal_small": normal_small, "ious": ious, "kinds": kinds, "names": names,
            "pixel_auroc": pixel_auroc(masks, maps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vmad", action="append", required=True, metavar="LABEL=MODEL[@PRIOR][,norefine]")
    ap.add_argument("--data", nargs="+", required=True, type=Path, help="folder-format sets")
    ap.add_argument("--prior-of", action="append", default=[], metavar="SET=PRIOR",
                    help="the prior use for the set named SET (its folder name), overriding @PRIOR")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    prior_of = dict(p.split("=", 1) for p in args.prior_of)
    specs = [parse_vmad(v) for v in args.vmad]
    rows, notes = [], []
    for data in args.data:
        for label, model, prior, refine in specs:
            use = prior_of.get(data.name, prior)
            det = Detector.from_pretrained(model, config=DetectorConfig(prior=use, refine=refine))
            r = measure(det, data)
            ious = np.array(r["ious"])
            cells = [data.name, label, use, str(r["n"]),
                     f"{np.mean(r['normal_small']):.2f}" if r["normal_small"] else "–",
                     f"{ious.mean():.3f}", f"{(ious >= 0.3).mean():.2f}", f"{100 * r['pixel_auroc']:.1f}"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
            if r["kinds"]:
                notes.append(f"- {data.name}, {label}: mean IoU per kind: " + ", ".join(
                    f"{k} {np.mean(v):.3f} ({len(v)})" for k, v in r["kinds"].items()))
            if len(r["names"]) <= 10:
                notes.append(f"- {data.name}, {label}: IoU per defect image: " + ", ".join(
                    f"{n} {v:.3f}" for n, v in r["names"]))
    head = ["Data", "Method", "prior", "images", "normal, mask < 1 %", "defect mean IoU", "IoU >= 0.3",
            "Pixel AUROC"]
    details = ["- masks: each model's binary mask at its default threshold (probability 0.5), as `vmad "
               "detect` writes it; pixel AUROC pooled over the set's images on the maps (log-odds)",
               "- VMAD models: " + "; ".join(f"{lab} = `{m}`" + ("" if ref else " (mask refiner off)")
                                             for lab, m, _, ref in specs)]
    write_report(args.out, "Binary masks: normal images kept clean, defects found (IoU)", details, head, rows,
                 notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
