"""VMAD-small and MuSc side by side, zero-shot, on the same images (issue 6 point 5).

Runs both scorers through the same evaluation engine (`vmad.eval.evaluate`, defaults of `vmad eval`) on the
test split of each dataset, writes each run's results.json / results.md under --out-dir and one side-by-side
Markdown table (with machine, date and command) to --out.

    python benchmarks/compare_small_musc.py --vmad VMAD-small=small --vmad "prior=RUN/final" \
        --vmad "prior, no prior=RUN/final@off" --out benchmarks/results/small_vs_musc.md --out-dir /tmp/svm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _machine import write_report  # benchmarks/_machine.py

from vmad.baselines import build_baseline
from vmad.data import load_dataset
from vmad.eval import evaluate
from vmad.eval.tables import pct, secs
from vmad.infer.detector import build_scorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# (dataset folder under ../shared/data, at most this many test images per class: None = all; `--sets
# NAME:CAP` subsamples evenly over the class, the engine's rule). Default: every test image.
DEFAULT_SETS: tuple[tuple[str, int | None], ...] = (
    ("mvtec_ad/bottle", None),
    ("mpdd_metal_plate", None),
    ("magnetic_tile", None),
    ("neu_seg", None),
)
KEYS = (("image_auroc", "Img AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO"),
        ("image_ap", "Img AP"), ("pixel_ap", "Pixel AP"))


def parse_vmad(spec: str) -> tuple[str, str, str, bool]:
    """``LABEL=MODEL[@PRIOR][,norefine]`` -> (label, model, prior use: ``folder`` (default), ``folder+self``,
    ``self`` or ``off``, refine: False with ``,norefine`` (a model with a mask refiner, run without it))."""
    label, _, rest = spec.partition("=")
    rest, _, flag = rest.partition(",")
    model, _, prior = rest.partition("@")
    if not label or not model or prior not in ("", "folder", "folder+self", "self", "off") or flag not in (
            "", "norefine"):
        raise SystemExit(f"--vmad {spec!r}: expected LABEL=MODEL[@folder|@folder+self|@self|@off][,norefine]")
    return label, model, prior or "folder", flag != "norefine"


def prior_label(scorer: object, prior: str) -> str:
    """The prior mode as the report names it: a model without the prior input takes none whatever asked."""
    if prior == "off" or scorer._uses_priors():  # type: ignore[attr-defined]
        return prior
    return "none (the model takes no prior)"


def run_rows(scorers: dict[str, object], sets: tuple[tuple[str, int | None], ...], out_dir: Path
             ) -> list[str]:
    rows = []
    for name, cap in sets:
        dataset = load_dataset(SHARED / name)
        for method, scorer in scorers.items():
            out = out_dir / method.replace(" ", "_").replace("/", "_") / name.replace("/", "_")
            res = evaluate(scorer, [dataset], split="test", out_dir=out, max_per_class=cap, progress=False)
            mean = res.results["mean"]
            n = sum(c["n_normal"] + c["n_anomalous"] for c in res.results["classes"].values())
            cells = [name, method, str(n)] + [pct(mean.get(k)) for k, _ in KEYS]
            cells.append(secs(res.results["timing"].get("model_s_per_image")))
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmad", action="append", default=None, metavar="LABEL=MODEL[@PRIOR][,norefine]",
                        help="a VMAD model to score (repeatable; default 'VMAD-small=small'); @off: a "
                        "prior_prompt model run without its normality prior (single-image mode); @self: "
                        "each image alone with its self prior (OURS); @folder+self: folder, and an image "
                        "unlike the others gets its self prior; ,norefine: a model with a mask refiner run "
                        "without it (OURS)")
    parser.add_argument("--no-musc", action="store_true", help="leave MuSc out")
    parser.add_argument("--musc-group-size", type=int, default=200, metavar="N",
                        help="MuSc scores a class of more than N images in interleaved groups of at most N "
                        "(MuScConfig.group_size; the normality priors use 200 too); 0 = all at once")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the per-run results")
    parser.add_argument("--sets", nargs="*", help="dataset[:max_per_class] under ../shared/data")
    args = parser.parse_args()
    sets = DEFAULT_SETS
    if args.sets:
        sets = tuple((s.split(":")[0], int(s.split(":")[1]) if ":" in s else None) for s in args.sets)
    if not SHARED.is_dir():
        print(f"skip: {SHARED} is absent", file=sys.stderr)
        return 0
    specs = [parse_vmad(v) for v in (args.vmad or ["VMAD-small=small"])]
    scorers: dict[str, object] = {
        label: build_scorer(model, prior=prior, **({} if refine else {"refine": False}))
        for label, model, prior, refine in specs
    }
    if not args.no_musc:
        scorers["MuSc (folder)"] = build_baseline("musc", group_size=args.musc_group_size)
    rows = run_rows(scorers, sets, args.out_dir)
    head = ["Data (test split)", "Method", "images"] + [h for _, h in KEYS] + ["s/img model"]
    details = [
        "- VMAD models: " + "; ".join(f"{lab} = `{model}` (prior: {prior_label(scorers[lab], prior)}"
                                      + ("" if refine else ", mask refiner off") + ")"
                                      for lab, model, prior, refine in specs),
        "- MuSc: `MuScConfig` defaults (EfficientNet-Lite0), mutual scoring over each class's test images,",
        f"  in interleaved groups of at most {args.musc_group_size} images (0 = all at once); priors: groups",
        "  of at most 200",
        "- mode: prior `folder` = the normality prior of each image by mutual scoring over its class's test",
        "  images (vmad.baselines.prior; only models trained with mask_decoder.prior_prompt use it);",
        "  `self` = each image alone with its self prior (its own patches, OURS); `off` = single-image",
        "  mode, no prior",
        "- engine: `vmad eval` defaults (bilinear resize to each mask, Gaussian sigma 4 mask px); test",
        "  images per class (a cap = evenly spaced subsample): "
        + ", ".join(f"{n} {c or 'all'}" for n, c in sets),
    ]
    title = "VMAD-small vs MuSc on the same images (bottle: zero-shot for both)"
    notes = ["Values in percent; – = undefined (NEU-Seg has no normal image)."]
    write_report(args.out, title, details, head, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
