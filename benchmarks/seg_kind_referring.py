"""Referring segmentation by defect kind: does the mask follow the kind the question names? (OURS, issue 14)

Normal test images get two distinct synthetic kinds painted (`vmad.data.synth`, seeded per image), and the
model is asked about each in turn with `vmad.data.prompts.KIND_QUESTION`. For the asked kind K the map is
scored against K's pixels with four `<seg>` states (single-image mode, `--prior off`):

- own: the state of the question about K;
- other kind's: the state of the same image asked about the other painted kind (the question reaches the mask
  only through H̄_seg, Eq. 4-5, so this is the swap of the state and nothing else);
- fixed: the state the model gives a uniform mid-grey 384x384 image asked about K (`seg_state_dependence.py`);
- paper question: the state of the paper's segmentation question (no kind named).

Figures per set, pooled over every (image, asked kind): pixel AUROC (positives K's pixels, negatives all
others, the other kind's included), kind AUROC (only the pixels of the two kinds: 50 = the map does not tell
them apart) and the mean IoU of the binary mask with K's pixels.

    python benchmarks/seg_kind_referring.py --vmad 'small=small' --vmad 'kind=runs/kind1/final' \
        --sets mpdd_metal_plate magnetic_tile HELDOUT --per-set 40 --out FILE
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _machine import write_report  # benchmarks/_machine.py
from seg_state_dependence import capture_state

from vmad.data import load_dataset
from vmad.data.io import read_image
from vmad.data.prompts import KIND_QUESTION, kind_question
from vmad.data.synth import SYNTHETIC_KINDS, synthesize_kinds
from vmad.eval.metrics import image_auroc, pixel_auroc
from vmad.infer.detector import Detector, DetectorConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STATES = ("own", "other kind's", "fixed", "paper question")


def painted_pairs(root: Path, n: int, seed: int) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """Up to ``n`` normal images of ``root`` (test split when it has one), each with two distinct kinds
    painted: ``(class name, image, {kind: its pixels (less those the second kind covers)})``."""
    dataset = load_dataset(root)
    samples = dataset.select(split="test") if "test" in dataset.splits() else list(dataset.samples)
    normals = [s for s in samples if not s.is_anomalous]
    picked = [normals[i] for i in np.random.default_rng(seed).permutation(len(normals))[:n]]
    out = []
    for i, sample in enumerate(picked):
        rng = np.random.default_rng([seed, i])
        image = read_image(sample.image_path)
        kinds = [SYNTHETIC_KINDS[j] for j in rng.permutation(len(SYNTHETIC_KINDS))[:2]]
        painted, masks = synthesize_kinds(image, rng, kinds)
        out.append((sample.class_name, painted, dict(zip(kinds, masks, strict=True))))
    return out


def ranked_map(detection) -> np.ndarray:  # noqa: ANN001
    """The map the engine ranks: the log-odds where the model gives them, else the probabilities."""
    logits = getattr(detection, "logit_map", None)
    return np.asarray(logits if logits is not None else detection.probability_map, dtype=np.float64)


def with_state(detector: Detector, state: torch.Tensor | None) -> Callable[[], None]:
    """Replace every H̄_seg the decoder gets by ``state`` (None: leave it); returns the undo."""
    model = detector.model
    if state is None:
        return lambda: None
    original = type(model).mask_logits

    def fixed(encoded, h_seg, size):  # noqa: ANN001, ANN202
        return original(model, encoded, state.to(h_seg).expand_as(h_seg), size)

    model.mask_logits = fixed

    def undo() -> None:
        del model.mask_logits

    return undo


def measure(detector: Detector, pairs: list, grey: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{state: {pixel_auroc, kind_auroc, iou}} pooled over every (image, asked kind)."""
    maps: dict[str, list[np.ndarray]] = {s: [] for s in STATES}
    masks: dict[str, list[np.ndarray]] = {s: [] for s in STATES}
    targets: list[np.ndarray] = []
    others: list[np.ndarray] = []
    for class_name, image, kinds in pairs:
        asked = {k: detector.detect([image], question=kind_question(class_name, k))[0] for k in kinds}
        paper = detector.detect([image], class_name=class_name)[0]
        for k, target in kinds.items():
            other = next(o for o in kinds if o != k)
            key = f"{class_name}:{k}"
            if key not in grey:
                grey_image = np.full((384, 384, 3), 128, dtype=np.uint8)
                grey[key] = capture_state(detector, grey_image, question=kind_question(class_name, k))
            undo = with_state(detector, grey[key])
            try:
                fixed = detector.detect([image], question=kind_question(class_name, k))[0]
            finally:
                undo()
            for state, det in zip(STATES, (asked[k], asked[other], fixed, paper), strict=True):
                maps[state].append(ranked_map(det))
                masks[state].append(np.asarray(det.mask, dtype=bool))
            targets.append(target)
            others.append(kinds[other])
    result = {}
    for state in STATES:
        both = [(m[t | o], t[t | o]) for m, t, o in zip(maps[state], targets, others, strict=True)]
        ious = [float((b & t).sum() / max((b | t).sum(), 1))
                for b, t in zip(masks[state], targets, strict=True)]
        result[state] = {
            "pixel_auroc": pixel_auroc([t.astype(np.uint8) for t in targets], maps[state]),
            "kind_auroc": image_auroc(np.concatenate([t for _, t in both]).astype(np.uint8),
                                      np.concatenate([s for s, _ in both])),
            "iou": float(np.mean(ious)),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmad", action="append", required=True, metavar="LABEL=MODEL",
                        help="a model to measure (small or a checkpoint folder), repeatable")
    parser.add_argument("--sets", nargs="+", required=True,
                        help="datasets with normal images: a folder under ../shared/data or an absolute path")
    parser.add_argument("--per-set", type=int, default=40, help="normal images per set (each asked twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    args = parser.parse_args()
    data = {}
    for spec in args.sets:
        path = Path(spec) if Path(spec).is_absolute() else SHARED / spec
        if not path.exists():
            print(f"skip: {path} is absent", file=sys.stderr)
            continue
        data[path.name] = painted_pairs(path, args.per_set, args.seed)
    rows = []
    for spec in args.vmad:
        label, _, model = spec.partition("=")
        detector = Detector.from_pretrained(model, config=DetectorConfig(prior="off"))
        grey: dict[str, torch.Tensor] = {}
        for name, pairs in data.items():
            for state, r in measure(detector, pairs, grey).items():
                cells = [name, label, state, str(2 * len(pairs)), f"{100 * r['pixel_auroc']:.1f}",
                         f"{100 * r['kind_auroc']:.1f}", f"{r['iou']:.3f}"]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    head = ["Data (normal images, two kinds painted)", "Model", "<seg> state", "asked", "Pixel AUROC",
            "Kind AUROC", "Mean IoU"]
    details = [
        f"- {args.per_set} normal images per set (test split where there is one), two distinct synthetic "
        f"kinds painted on each (seed {args.seed}); each image asked about each of its kinds: "
        "\"" + KIND_QUESTION.format(kind="KIND", object="OBJECT") + "\"",
        "- single-image mode (`--prior off`); states: own = the asked question's; other kind's = the same "
        "image asked about its other kind; fixed = a mid-grey image asked the same question; paper "
        "question = the paper's segmentation question (no kind named)",
    ]
    notes = [
        "Pixel AUROC: every pixel, positives the asked kind's; Kind AUROC: only the two kinds' pixels (50 = "
        "the map does not tell them apart); Mean IoU: the binary mask against the asked kind's pixels. "
        "Values in percent except IoU.",
    ]
    write_report(args.out, "Referring segmentation by defect kind: does the mask follow the <seg> state?",
                 details, head, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
