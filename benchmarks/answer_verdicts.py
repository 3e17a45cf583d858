"""Does VMAD's text answer tell normal from anomalous images? (answer mode, `vmad detect`'s default question)

For every test image the detector generates its answer to the default segmentation + description question
(greedy, as `vmad detect`). The answer's verdict is "normal" when, after "It is <seg>.", it opens with the
normal description the training data uses (`vmad.data.text.normal_answers`: "No defect was found: ..."), and
"anomalous" otherwise. Reported per set: how often each verdict is given to normal and to anomalous images,
and the balanced accuracy; then two rankings of the same images: by the LLM's text score (minus the
teacher-forced log-likelihood of that normal description after "It is <seg>.", `VMADModel.answer_logprobs`:
does the LLM hold any image signal that greedy decoding hides?) and by the mask-based image score. Last, the
verdict of the binary mask itself (non-empty = anomalous; `vmad detect`'s mask, probability > 0.5) as a
reference, and how often the answer's verdict agrees with it (is the answer grounded in the mask shown?).

    python benchmarks/answer_verdicts.py --model small --out benchmarks/results/answer_verdicts.md

OURS options: ``--answer-verdict evidence`` (the segmentation verdict fixes whether the answer says "No defect
was found", `DetectorConfig.answer_verdict`); ``--n-calib N``: per class the first N normal test images (by
name) calibrate the image threshold (`Detector.calibrate`, the `vmad calibrate` rule) and are left out of the
judged images. A model with a normality prior gets each image's prior by mutual scoring over its class's test
images (folder mode, as `vmad eval`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from _machine import write_report  # benchmarks/_machine.py

from vmad.data import load_dataset, read_image
from vmad.data.text import normal_answers
from vmad.eval.engine import subsample
from vmad.eval.metrics import image_auroc
from vmad.infer.detector import Detector, DetectorConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SETS = ("mvtec_ad/bottle", "mpdd_metal_plate", "magnetic_tile:60", "neu_seg:60")


def says_normal(answer: str, class_name: str) -> bool:
    """True when the answer (after the seg sentence) opens with the training data's normal description."""
    text = answer.split("<seg>.", 1)[-1].strip()
    return text.startswith(normal_answers(class_name)["description"].split(":")[0])


def pct(x: float) -> str:
    return "–" if np.isnan(x) else f"{100 * x:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="VMAD weights: small or a checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--sets", nargs="*", default=list(DEFAULT_SETS),
                        help="dataset[:max_per_class] under ../shared/data (test split)")
    parser.add_argument("--answer-verdict", choices=("model", "evidence"), default="model")
    parser.add_argument("--n-calib", type=int, default=0,
                        help="normal test images per class that calibrate the image threshold (0 = none)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skip: {SHARED} is absent", file=sys.stderr)
        return 0
    config = DetectorConfig(answer_verdict=args.answer_verdict)
    rows = []
    for spec in args.sets:
        name, _, cap = spec.partition(":")
        dataset = load_dataset(SHARED / name)
        for class_name in dataset.class_names():
            detector = Detector.from_pretrained(args.model, config=config)
            samples = subsample(dataset.select(class_name=class_name, split="test"), int(cap or 0) or None)
            images = [read_image(s.image_path) for s in samples]
            priors = detector.normality_priors(images)
            calib = sorted((s.image_path, i) for i, s in enumerate(samples) if s.label == 0)[: args.n_calib]
            if calib:
                detector.calibrate([images[i] for _, i in calib], class_name=class_name,
                                   priors=None if priors is None else priors.subset([i for _, i in calib]))
            judged = [i for i in range(len(samples)) if i not in {i for _, i in calib}]
            labels, normal_said, scores, text_scores, mask_hit = [], [], [], [], []
            question = detector.default_question(class_name, answer=True)
            seg_answer = detector.model.config.llm.seg_answer
            normal = f"{seg_answer} {normal_answers(class_name)['description']}"
            for i in judged:
                sample, image = samples[i], images[i]
                extra = {} if priors is None else {"priors": priors.subset([i])}
                [det] = detector.detect([image], class_name=class_name, answer=True, **extra)
                labels.append(sample.label)
                normal_said.append(says_normal(det.answer or "", class_name))
                scores.append(det.anomaly_score)
                mask_hit.append(bool(det.mask.any()))
                tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)[None]
                lp = detector.model.answer_logprobs(tensor, question, normal, after=seg_answer)
                text_scores.append(-float(lp[0]))
            y, said, hit = np.array(labels), np.array(normal_said), np.array(mask_hit)
            n_norm, n_anom = int((y == 0).sum()), int((y == 1).sum())
            tnr = float(said[y == 0].mean()) if n_norm else float("nan")
            tpr = float((~said[y == 1]).mean()) if n_anom else float("nan")
            balanced = (tnr + tpr) / 2 if n_norm and n_anom else float("nan")
            mask_tnr = float((~hit[y == 0]).mean()) if n_norm else float("nan")
            mask_tpr = float(hit[y == 1].mean()) if n_anom else float("nan")
            mask_balanced = (mask_tnr + mask_tpr) / 2 if n_norm and n_anom else float("nan")
            agree = float((said != hit).mean())
            both = n_norm and n_anom
            auroc = image_auroc(y, np.array(scores)) if both else float("nan")
            text_auroc = image_auroc(y, np.array(text_scores)) if both else float("nan")
            cells = [name, class_name, f"{n_norm} / {n_anom}", pct(tnr), pct(tpr), pct(balanced),
                     pct(text_auroc), pct(auroc), pct(mask_balanced), pct(agree)]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    head = ["Data (test split)", "class", "normal / anomalous", "normal said normal", "anomalous said defect",
            "balanced acc.", "text-score Img AUROC", "mask-score Img AUROC", "mask verdict balanced acc.",
            "answer agrees with mask"]
    details = [
        f"- VMAD weights: `{args.model}`; answer mode with the default question (segmentation + description,",
        "  object = class name), greedy generation, 96 new tokens at most; one image at a time",
        f"- answer verdict: `{args.answer_verdict}`; image threshold: "
        + (f"calibrated on the first {args.n_calib} normal test images of each class (left out of the counts)"
           if args.n_calib else "none"),
    ]
    notes = [
        'Values in percent. "normal said normal": share of normal images whose answer opens with "No defect',
        'was found"; "anomalous said defect": share of anomalous images whose answer does not; balanced',
        "acc.: their mean (50 = no better than a constant answer). Text-score Img AUROC: the images ranked",
        "by -log p(normal description | image, question, \"It is <seg>.\"; without a normality prior);",
        "mask-score Img AUROC: ranked by",
        "the mask-based image score (`vmad eval`'s image score). Mask verdict: anomalous when the binary",
        "mask (probability > the mask threshold: 0.5, or the calibrated threshold with --n-calib) is",
        "non-empty; answer agrees with mask: share of images where the answer's",
        "verdict equals the mask verdict.",
    ]
    write_report(args.out, "Does the text answer tell normal from anomalous?", details, head, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
