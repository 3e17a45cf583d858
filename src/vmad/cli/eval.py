"""``vmad eval``: run a baseline or a VMAD model over datasets and write results.json + results.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from vmad.cli.data import add_data_options, options_from_args
from vmad.cli.options import add_baseline_opt, add_prior_opt, add_refine_opt
from vmad.errors import ConfigError

if TYPE_CHECKING:
    from vmad.eval.scorer import Scorer

SPLITS = ("train", "val", "test", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a baseline or a VMAD model (image/pixel AUROC, AP, AUPRO, F1-max, s/img)",
        description="Run a scorer class by class over one or more datasets and write results.json and a "
        "Markdown table (results.md) laid out like the paper's Table I. Maps are resized bilinearly to each "
        "mask's size and smoothed with a Gaussian (--sigma, in mask pixels). Per class, results.json also "
        "stores the image and pixel thresholds found (classes.<name>.thresholds: F1-max and at 5 % FPR on "
        "normals; anomalous when score > threshold).",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--baseline", metavar="NAME", help="a training-free baseline (e.g. musc)")
    who.add_argument("--model", metavar="NAME_OR_PATH", help="a VMAD checkpoint or preset")
    add_baseline_opt(parser)
    parser.add_argument(
        "--data",
        metavar="PATH",
        action="append",
        required=True,
        help="dataset root or class folder (repeatable)",
    )
    parser.add_argument("--format", help="dataset layout for every --data (default: detected)")
    add_data_options(parser)
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: eval_results/<scorer>)")
    parser.add_argument(
        "--sigma",
        type=float,
        default=4.0,
        help="Gaussian smoothing of the maps in mask pixels; 0 = none (default: 4)",
    )
    parser.add_argument("--fpr-limit", type=float, default=0.3, help="AUPRO integration limit (default 0.3)")
    parser.add_argument(
        "--max-per-class",
        type=int,
        metavar="N",
        help="at most N images per class, evenly spaced over the class",
    )
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_speed_options(parser)
    parser.set_defaults(func=run)


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    """Batching, decoding workers and device (results do not depend on them)."""
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="--model only: images per forward (default 4); the engine hands the model B images at a time",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes decoding the next images while the current ones are scored (default 1; 0 = none)",
    )
    parser.add_argument(
        "--device", metavar="DEV", help="--model only: auto (default: CUDA when available), cpu, cuda, ..."
    )
    add_prior_opt(parser)
    add_refine_opt(parser)
    parser.add_argument(
        "--group-size", type=int, default=None, metavar="N",
        help="--model with a normality prior: a class of more than N test images is scored in interleaved "
        "groups of at most N, each group's priors within it (bounds memory); default 0 = each class at once",
    )


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without "=" or with an empty key is a ConfigError."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--baseline-opt {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def build_scorer(args: argparse.Namespace) -> Scorer:
    """The scorer named by ``--baseline NAME`` (with its ``--baseline-opt`` fields) or ``--model``."""
    if args.baseline is not None:
        from vmad.baselines import build_baseline

        return build_baseline(args.baseline, **parse_options(args.baseline_opt))
    if args.baseline_opt:
        raise ConfigError("--baseline-opt needs --baseline")
    from vmad.infer.detector import build_scorer as build_model_scorer

    return build_model_scorer(args.model, **_model_options(args))


def _model_options(args: argparse.Namespace) -> dict[str, object]:
    """``--batch-size`` / ``--device`` / ``--prior`` / ``--group-size`` as detector options (only the given
    ones)."""
    options: dict[str, object] = {}
    if getattr(args, "batch_size", None) is not None:
        options["batch_size"] = args.batch_size
    if getattr(args, "device", None) is not None:
        options["device"] = args.device
    if getattr(args, "prior", None) is not None:
        options["prior"] = args.prior
    if getattr(args, "group_size", None) is not None:
        options["prior_group_size"] = args.group_size
    if not getattr(args, "refine", True):
        options["refine"] = False
    return options


def run(args: argparse.Namespace) -> int:
    from vmad.data import load_dataset
    from vmad.eval.engine import EvalSettings, evaluate

    settings = EvalSettings(
        split=None if args.split == "all" else args.split,
        smoothing_sigma=args.sigma,
        fpr_limit=args.fpr_limit,
        max_per_class=args.max_per_class,
        workers=args.workers,
    )
    settings.validate()
    if args.baseline is not None and _model_options(args):
        raise ConfigError("--batch-size, --device, --prior, --group-size and --no-refine apply to --model (a "
                          "baseline scores a class at once)")
    options = options_from_args(args)
    datasets = [load_dataset(path, args.format, options) for path in args.data]  # fail before model loading
    scorer = build_scorer(args)
    if getattr(args, "prior", None) and not getattr(scorer, "takes_prior", False):
        raise ConfigError(f"--prior: model {args.model!r} takes no normality prior (only models with "
                          "mask_decoder.prior_prompt do)")
    if not getattr(args, "refine", True) and not getattr(scorer, "has_refiner", False):
        raise ConfigError(f"--no-refine: model {args.model!r} has no mask refiner (only models with "
                          "mask_decoder.refiner do)")
    out_dir = Path(args.out) if args.out else Path("eval_results") / scorer.name
    result = evaluate(
        scorer, datasets, out_dir=out_dir, settings=settings, progress=False if args.no_progress else None
    )
    if args.json:
        print(json.dumps(result.results, indent=2, allow_nan=False))
    else:
        print(result.markdown, end="")
        print(f"\nwrote {', '.join(str(p) for p in result.paths.values())}")
    return 0
