"""``vmad eval``: run a baseline or a VMAD model over datasets and write results.json + results.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

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
        "mask's size and smoothed with a Gaussian (--sigma, in mask pixels).",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--baseline", metavar="NAME", help="a training-free baseline (e.g. musc)")
    who.add_argument("--model", metavar="NAME_OR_PATH", help="a VMAD checkpoint or preset")
    parser.add_argument(
        "--baseline-opt",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a baseline config field (repeatable), e.g. --baseline-opt image_size=320",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        action="append",
        required=True,
        help="dataset root or class folder (repeatable)",
    )
    parser.add_argument("--format", help="dataset layout for every --data (default: detected)")
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
    parser.set_defaults(func=run)


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

    return build_model_scorer(args.model)


def run(args: argparse.Namespace) -> int:
    from vmad.data import load_dataset
    from vmad.eval.engine import EvalSettings, evaluate

    settings = EvalSettings(
        split=None if args.split == "all" else args.split,
        smoothing_sigma=args.sigma,
        fpr_limit=args.fpr_limit,
        max_per_class=args.max_per_class,
    )
    settings.validate()
    datasets = [load_dataset(path, args.format) for path in args.data]  # bad paths fail before model loading
    scorer = build_scorer(args)
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
