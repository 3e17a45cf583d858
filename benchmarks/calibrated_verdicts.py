"""Calibrated verdicts on a new object: `vmad calibrate` on a few normal images, then `vmad detect
--threshold-file` on the rest, VMAD-small and MuSc side by side (issue 18's acceptance).

Protocol (fixed before any result was seen; nothing is tuned on the evaluated class): the first
``--n-calib`` normal test images of the class, sorted by name, are the calibration images and are left out of
the scoring; every other test image of the class is scored. The threshold rule is the package's
(`vmad.infer.calibration`: one-sided 95 % upper prediction bound of the normal scores, Student t, never below
the highest one). Each method runs through the command line exactly as a user would, in a temporary folder:

- VMAD-small: `vmad calibrate --model small --class-name CLASS`, then `vmad detect --no-answer` (the score,
  and so the verdict, does not depend on the answer: benchmarks/results/seg_state_dependence.md); a model with
  a normality prior (the packaged small since 2026-12-04) scores the test folder in folder mode, and once more
  with `--prior off` (each image as if alone, judged by the threshold file's `without_prior` threshold);
- MuSc, reference mode: `vmad calibrate --baseline musc`, then `vmad detect --baseline musc --threshold-file`
  (each image scored against the calibration images, the statistic the threshold was derived from);
- MuSc, zero-shot folder mode with the same threshold (`--image-threshold T`): the images scored against each
  other, as MuSc is published; the threshold comes from a different statistic (leave-one-out among the
  calibration images), reported to show what mixing the two gives.

Reported per method: the threshold, true-positive rate (anomalous called anomalous), true-negative rate, their
mean (balanced accuracy) and, for context, the image AUROC of the same scores (threshold-free).

    python benchmarks/calibrated_verdicts.py --out benchmarks/results/calibrated_verdicts.md \
        [--prior-model DIR]   # a `vmad model add-prior` output: one more row, folder mode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _machine import write_report  # benchmarks/_machine.py

from vmad.data import load_dataset
from vmad.eval.metrics import image_auroc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VMAD = [sys.executable, "-m", "vmad"]


def run(argv: list[str]) -> None:
    """Run a vmad command (its output discarded, errors shown)."""
    print("$ vmad " + " ".join(argv), flush=True)
    subprocess.run([*VMAD, *argv], check=True, stdout=subprocess.DEVNULL)


def verdict_row(name: str, summary: dict, labels: dict[str, int], cal: dict) -> tuple[str, dict]:
    """A Markdown row and the figures of one method from its summary.json and its threshold file."""
    stats, units = cal["stats"], ("log-odds " if cal.get("scale") == "logit" else "")
    rows = [r for r in summary["images"] if r["error"] is None]
    y = np.array([labels[str(Path(r["file"]).resolve())] for r in rows])
    anomalous = np.array([r["verdict"] == "anomalous" for r in rows])
    scores = np.array([r["score"] for r in rows])
    tpr = float(anomalous[y == 1].mean())
    tnr = float((~anomalous[y == 0]).mean())
    figures = {
        "threshold": summary["image_threshold"],
        "tpr": tpr,
        "tnr": tnr,
        "balanced_accuracy": (tpr + tnr) / 2,
        "auroc": image_auroc(y, scores),
        "n_anomalous": int(y.sum()),
        "n_normal": int((y == 0).sum()),
    }
    cells = [
        name,
        f"{units}{stats['mean']:.4g} / {stats['std']:.3g} / "
        f"{min(cal['scores']):.4g} .. {max(cal['scores']):.4g}",
        f"{figures['threshold']:.4g}",
        f"{int(anomalous[y == 1].sum())} / {figures['n_anomalous']}",
        f"{int((~anomalous[y == 0]).sum())} / {figures['n_normal']}",
        f"{100 * tpr:.1f}",
        f"{100 * tnr:.1f}",
        f"**{100 * figures['balanced_accuracy']:.1f}**",
        f"{100 * figures['auroc']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |", figures


def _threshold_note(figures: dict, stats: dict) -> list[str]:
    """A sentence for every method whose threshold is at or above 1 on a [0, 1] score (VMAD)."""
    out = []
    for name, fig in figures.items():
        if name.startswith("VMAD") and fig["threshold"] >= 1.0:
            scores = stats[name]["scores"]
            out.append(
                f"{name}: its image score is a probability (at most 1) and the threshold is "
                f"{fig['threshold']:.3g}: the {len(scores)} normal scores spread from {min(scores):.3g} to "
                f"{max(scores):.3g}, so every image is called normal (`vmad calibrate` says so when it "
                "writes the file)."
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mvtec_ad", help="dataset folder under ../shared/data")
    parser.add_argument("--class-name", default="bottle")
    parser.add_argument("--n-calib", type=int, default=5, help="normal test images used for calibration")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--prior-model", metavar="DIR",
                        help="also a VMAD model with a normality prior (`vmad model add-prior`): calibrated "
                        "on the normal images (priors among themselves), the test folder in folder mode")
    args = parser.parse_args()
    if not (SHARED / args.dataset).is_dir():
        print(f"skip: {SHARED / args.dataset} is absent", file=sys.stderr)
        return 0
    samples = load_dataset(SHARED / args.dataset).select(args.class_name, "test")
    normals = sorted((s for s in samples if not s.is_anomalous), key=lambda s: s.image_path.name)
    calib = normals[: args.n_calib]
    rest = [s for s in samples if s not in calib]
    labels = {str(s.image_path.resolve()): int(s.is_anomalous) for s in rest}
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="vmad-calib-") as tmp:
        work = Path(tmp)
        test_dir = work / "test"
        for s in rest:  # keep the defect folder: names repeat across folders
            link = test_dir / s.defect_type / s.image_path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(s.image_path.resolve(), link)
        normal_args = [a for s in calib for a in ("--normal", str(s.image_path))]
        cls = ["--class-name", args.class_name]
        runs = {
            "VMAD-small": (
                ["calibrate", *normal_args, "--model", "small", *cls, "--out", str(work / "vmad.json")],
                ["detect", str(test_dir), "--model", "small", *cls, "--no-answer", "--threshold-file",
                 str(work / "vmad.json"), "--out", str(work / "out_vmad"), "--no-progress"],
            ),
            "MuSc, reference mode": (
                ["calibrate", *normal_args, "--baseline", "musc", "--out", str(work / "musc.json")],
                ["detect", str(test_dir), "--baseline", "musc", "--threshold-file", str(work / "musc.json"),
                 "--out", str(work / "out_musc_ref"), "--no-progress"],
            ),
        }
        if args.prior_model:
            prior, model = str(work / "prior.json"), args.prior_model
            runs["VMAD-small + prior (folder)"] = (
                ["calibrate", *normal_args, "--model", model, *cls, "--out", prior],
                ["detect", str(test_dir), "--model", model, *cls, "--no-answer", "--threshold-file", prior,
                 "--out", str(work / "out_prior"), "--no-progress"],
            )
        stats = {}
        for name, (calibrate, detect) in runs.items():
            run(calibrate)
            run(detect)
            stats[name] = json.loads(Path(calibrate[calibrate.index("--out") + 1]).read_text())
            summary = json.loads((Path(detect[detect.index("--out") + 1]) / "summary.json").read_text())
            row, figures[name] = verdict_row(name, summary, labels, stats[name])
            rows.append(row)
        alone = stats["VMAD-small"].get("without_prior")
        if alone:  # a model with a normality prior: the test images each without one (as single images)
            out = work / "out_vmad_alone"
            run(["detect", str(test_dir), "--model", "small", *cls, "--no-answer", "--prior", "off",
                 "--threshold-file", str(work / "vmad.json"), "--out", str(out), "--no-progress"])
            summary = json.loads((out / "summary.json").read_text())
            summary["image_threshold"] = summary["image_threshold_without_prior"]
            name = "VMAD-small, --prior off (each image as if alone)"
            row, figures[name] = verdict_row(name, summary, labels, {**stats["VMAD-small"], **alone})
            rows.insert(1, row)
        threshold = json.loads((work / "musc.json").read_text())["image_threshold"]
        detect = ["detect", str(test_dir), "--baseline", "musc", "--image-threshold", repr(threshold),
                  "--out", str(work / "out_musc_zero"), "--no-progress"]
        run(detect)
        summary = json.loads((work / "out_musc_zero" / "summary.json").read_text())
        name = "MuSc, zero-shot folder (same T)"
        row, figures[name] = verdict_row(name, summary, labels, stats["MuSc, reference mode"])
        rows.append(row)
        calib_files = ", ".join(s.image_path.name for s in calib)
    write_report(
        args.out,
        f"Calibrated verdicts on {args.dataset} {args.class_name}: VMAD-small and MuSc",
        [
            f"- data: {args.dataset} class {args.class_name}, test split; calibration: the first "
            f"{args.n_calib} normal images by name (good/{calib_files}), left out; scored: the other "
            f"{len(rest)} ({sum(1 - v for v in labels.values())} normal, {sum(labels.values())} anomalous)",
            "- rule (`vmad.infer.calibration`): t = max(mean + q sd sqrt(1 + 1/n), max), q = Student-t 95 % "
            "quantile with n - 1 dof; anomalous when score > t; VMAD's scores are probabilities and the "
            "bound is taken on their log-odds (since 2026-12-03; the linear rule before put VMAD-small's "
            "threshold at 1.34 here, above every possible score)",
            "- commands: `vmad calibrate --normal ... --out FILE` then `vmad detect DIR --threshold-file "
            "FILE` (see the script's docstring for each method's options)",
        ],
        ["Method", "calibration scores: mean / sd / min .. max", "threshold", "anomalous called anomalous",
         "normal called normal", "TPR", "TNR", "balanced accuracy", "image AUROC"],
        rows,
        [
            "TPR / TNR / balanced accuracy / AUROC in percent over the scored images; calibration scores: "
            "the scores of the calibration images (MuSc: leave-one-out among them).",
            *_threshold_note(figures, stats),
            "The zero-shot MuSc row applies the reference-mode threshold to a different statistic (each "
            f"image against the {len(rest) - 1} others instead of against the {args.n_calib} calibration "
            "images); MuSc's threshold file puts `vmad detect` in reference mode for that reason.",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
