"""Command-line options shared by several subcommands (one definition each)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmad.infer.detector import DetectorConfig


def add_baseline_opt(parser: argparse.ArgumentParser) -> None:
    """``--baseline-opt KEY=VALUE`` (repeatable): a baseline config field."""
    parser.add_argument(
        "--baseline-opt",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a baseline config field (repeatable), e.g. --baseline-opt image_size=320",
    )


def add_prior_opt(parser: argparse.ArgumentParser) -> None:
    """``--prior`` (:attr:`vmad.infer.detector.DetectorConfig.prior`), for models with a normality prior."""
    parser.add_argument(
        "--prior",
        choices=("folder", "folder+self", "self", "off"),
        default=None,
        help="OURS, models that take a normality prior: folder (default) = mutual scoring over the folder "
        "(and --reference), a single image or one unlike the rest gets none; folder+self = such an image "
        "gets a prior from its own patches; self = every image on its own (references, else its own "
        "patches); off = no prior",
    )


def add_refine_opt(parser: argparse.ArgumentParser) -> None:
    """``--no-refine`` (:attr:`vmad.infer.detector.DetectorConfig.refine`), for models with a mask refiner."""
    parser.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="OURS, models with a mask refiner (mask_decoder.refiner): use the decoder's own mask logits, "
        "without the full-resolution refinement",
    )


def add_answer_verdict_opt(parser: argparse.ArgumentParser) -> None:
    """``--answer-verdict`` (:attr:`vmad.infer.detector.DetectorConfig.answer_verdict`)."""
    parser.add_argument(
        "--answer-verdict",
        choices=("model", "evidence"),
        default="model",
        help="model: the LLM alone decides whether the answer reports a defect; evidence (OURS): the "
        "segmentation verdict (image threshold when given, else a non-empty mask) fixes how the answer opens",
    )


def add_interactive_options(parser: argparse.ArgumentParser, verdict_per: str) -> None:
    """The inference options of ``vmad chat`` and ``vmad serve``: thresholds, answer length, image size
    limit, overlay opacity and device; ``verdict_per`` names what gets a verdict ("turn", "image")."""
    parser.add_argument(
        "--threshold-file",
        metavar="FILE",
        help=f"a `vmad calibrate` threshold file for this model: a verdict per {verdict_per}, and the mask "
        "threshold",
    )
    parser.add_argument(
        "--threshold", type=float, help="mask = probability > T (default: the threshold file's, else 0.5)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="answer length limit")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=4_194_304,
        metavar="N",
        help="images with more than N pixels are processed at a reduced size (2048x2048)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay heat-map opacity (0.5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    add_answer_verdict_opt(parser)


def interactive_config(args: argparse.Namespace) -> DetectorConfig:
    """The checked :class:`DetectorConfig` of :func:`add_interactive_options` (one image at a time; a
    ConfigError for a bad value or an unusable device)."""
    from vmad.infer.detector import DetectorConfig

    config = DetectorConfig(
        threshold=0.5 if args.threshold is None else args.threshold,
        batch_size=1,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        max_pixels=args.max_pixels,
        answer_verdict=args.answer_verdict,
    ).validate()
    config.torch_device()
    return config
