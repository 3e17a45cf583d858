"""How much do VMAD's masks depend on the LLM's <seg> state? (diagnostic for the Table III analogue)

Eq. 4-5 make the mask M_decoder(Γ(H̄_seg), f): the prompt Γ(H̄_seg) comes from the LLM, the image embedding f
from the backbone and neck. This script evaluates a checkpoint twice on the same test images with `vmad eval`
defaults: once as is ("own <seg> state"), once with every image's H̄_seg replaced by the state the same
model gives a uniform mid-grey image asked the same question ("fixed <seg> state"). If the two rows agree,
the masks carry (almost) no image-specific information from the LLM: they come from f and the decoder.

    python benchmarks/seg_state_dependence.py --model small --out benchmarks/results/seg_state_dependence.md \
        --out-dir /tmp/seg_state
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _machine import write_report  # benchmarks/_machine.py

from vmad.data import load_dataset
from vmad.eval import evaluate
from vmad.eval.scorer import ScoreOutput
from vmad.eval.tables import pct
from vmad.infer.detector import Detector, DetectorConfig, VMADScorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SETS = ("mvtec_ad/bottle", "mpdd_metal_plate:0", "magnetic_tile:140", "neu_seg:150")
KEYS = (("image_auroc", "Img AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO"),
        ("pixel_ap", "Pixel AP"))


def read_scores(csv_file: Path) -> dict[str, float]:
    """image -> score from the engine's image_scores.csv."""
    with csv_file.open(newline="", encoding="utf-8") as f:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(f)}


def capture_state(
    detector: Detector, image: np.ndarray, class_name: str | None = None, question: str | None = None
) -> torch.Tensor:
    """H̄_seg ``[1, D]`` the detector's model gives ``image`` asked ``question`` (None: the class question)."""
    model = detector.model
    captured: list[torch.Tensor] = []
    original = type(model).mask_logits

    def capture(encoded, h_seg, size):  # noqa: ANN001, ANN202
        captured.append(h_seg.detach().clone())
        return original(model, encoded, h_seg, size)

    model.mask_logits = capture
    try:
        detector.detect([image], question=question, class_name=class_name)
    finally:
        del model.mask_logits
    return captured[0]


class FixedSegStateScorer(VMADScorer):
    """The segmentation-only scorer with H̄_seg of every image replaced by the grey image's H̄_seg for the
    same class question."""

    def __init__(self, model: str, config: DetectorConfig | None = None) -> None:
        super().__init__(model, config)
        self.name = f"{self.name}-fixed-seg-state"
        self._states: dict[str, torch.Tensor] = {}

    def _reference_state(self, class_name: str) -> torch.Tensor:
        if class_name not in self._states:
            grey = np.full((384, 384, 3), 128, dtype=np.uint8)
            self._states[class_name] = capture_state(self.detector, grey, class_name)
        return self._states[class_name]

    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput:
        self.prepare()
        model = self.detector.model  # type: ignore[union-attr]
        state = self._reference_state(class_name)
        original = type(model).mask_logits

        def fixed(encoded, h_seg, size):  # noqa: ANN001, ANN202
            return original(model, encoded, state.expand_as(h_seg), size)

        model.mask_logits = fixed
        try:
            return super().score(images, class_name)
        finally:
            del model.mask_logits


class OtherImageSegStateScorer(VMADScorer):
    """The control: each image's H̄_seg replaced by the one of the image scored just before it (same class;
    the first image of a class gets the state of the last image of its batch)."""

    def __init__(self, model: str, config: DetectorConfig | None = None) -> None:
        super().__init__(model, config)
        self.name = f"{self.name}-other-image-seg-state"
        self._previous: dict[str, torch.Tensor] = {}

    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput:
        self.prepare()
        model = self.detector.model  # type: ignore[union-attr]
        if class_name not in self._previous:
            self._previous[class_name] = capture_state(self.detector, images[-1], class_name)
        original = type(model).mask_logits

        def shifted(encoded, h_seg, size):  # noqa: ANN001, ANN202
            states = torch.cat([self._previous[class_name].to(h_seg), h_seg])
            self._previous[class_name] = h_seg[-1:].detach().clone()
            return original(model, encoded, states[: len(h_seg)], size)

        model.mask_logits = shifted
        try:
            return super().score(images, class_name)
        finally:
            del model.mask_logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="VMAD weights: small or a checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the per-run results")
    parser.add_argument("--sets", nargs="*", default=list(DEFAULT_SETS),
                        help="dataset[:max_per_class]: a folder under ../shared/data or an absolute path "
                             "(e.g. the output of make_heldout_textures.py); 0 or none = all")
    parser.add_argument("--other-image", action="store_true",
                        help="also a control run: each image gets the state of the image scored before it")
    parser.add_argument("--prior", choices=("folder", "folder+self", "self", "off"), default="folder",
                        help="normality-prior use of a model that has the prior input (vmad eval --prior); "
                             "off = the decoder alone (single-image mode)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skip: {SHARED} is absent", file=sys.stderr)
        return 0
    config = DetectorConfig(prior=args.prior)
    scorers = {"own <seg> state": VMADScorer(args.model, config),
               "fixed <seg> state": FixedSegStateScorer(args.model, config)}
    if args.other_image:
        scorers["other image's <seg> state"] = OtherImageSegStateScorer(args.model, config)
    rows = []
    for spec in args.sets:
        name, _, cap = spec.partition(":")
        dataset = load_dataset(Path(name) if Path(name).is_absolute() else SHARED / name)
        name = Path(name).name if Path(name).is_absolute() else name  # no machine path in the report
        own: dict[str, float] = {}
        for label, scorer in scorers.items():
            out = args.out_dir / scorer.name / name.replace("/", "_")
            res = evaluate(scorer, [dataset], split="test", out_dir=out, max_per_class=int(cap or 0) or None,
                           progress=False)
            mean = res.results["mean"]
            n = sum(c["n_normal"] + c["n_anomalous"] for c in res.results["classes"].values())
            scores = read_scores(out / "image_scores.csv")
            delta = max(abs(scores[k] - own[k]) for k in scores) if own else None
            own = own or scores
            cells = [name, label, str(n)] + [pct(mean.get(k)) for k, _ in KEYS]
            cells.append("–" if delta is None else f"{delta:.1e}")
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    head = ["Data (test split)", "<seg> state", "images"] + [h for _, h in KEYS] + ["max abs. score change"]
    details = [
        "- own: the model as is; fixed: every image's H̄_seg (Eq. 4) replaced by the one the model gives",
        "  a uniform mid-grey 384x384 image with the same question (so the prompt carries no information on",
        "  the image); everything else, the images and the engine (`vmad eval` defaults) are the same",
        f"- normality prior (models with the prior input): `{args.prior}` (`vmad eval --prior`)",
    ]
    if args.other_image:
        details.append("- other image's: every image's H̄_seg replaced by the one of the test image scored "
                       "just before it (same class)")
    notes = [
        "Values in percent; – = undefined (NEU-Seg has no normal image). Max abs. score change: the largest",
        "difference of an image score (in [0, 1]) from the own-state run over the same images.",
    ]
    write_report(args.out, "Do VMAD's masks depend on the LLM's <seg> state?", details, head, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
