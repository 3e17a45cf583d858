"""``vmad calibrate --normal DIR --out FILE``: a verdict threshold from a few normal images of an object.

The images (every image under each ``--normal`` folder, recursively, sorted, or image files) are scored by
the chosen method, ``--model small|PATH`` (segmentation only unless ``--answer``) or ``--baseline musc``
(leave-one-out among the images, which become its references), and the threshold is derived by the rule of
:mod:`vmad.infer.calibration` (one-sided upper prediction bound at 1 - ``--fpr``, never below the highest
normal score). A model with a normality prior (OURS; the packaged small) scores the images twice, with
their priors (mutual scoring among them) and without, and the file holds both thresholds: an image that gets
no prior at detection (a single image) is judged on the decoder's own scale. The JSON file it writes is read
by ``vmad detect --threshold-file``, the chat and ``Detector.load_threshold_file``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from vmad.infer.calibration import DEFAULT_FPR, RULE_TEXT

    parser = subparsers.add_parser(
        "calibrate",
        help="a verdict threshold from a few normal images (writes a threshold file for detect / chat)",
        description="Score a few normal images of the object with a VMAD model or a baseline and write the "
        f"threshold that `vmad detect --threshold-file` uses for its verdict. Rule: {RULE_TEXT}. The mask "
        "threshold is set to the same value. At least 2 images; 5 or more recommended.",
    )
    parser.add_argument(
        "--normal",
        action="append",
        required=True,
        metavar="DIR_OR_IMAGE",
        help="a folder of normal images (recursive) or one normal image; repeatable",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the threshold file to write (JSON)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--model", metavar="small|PATH", help="'small' (default), a checkpoint folder or a training folder"
    )
    who.add_argument("--baseline", metavar="NAME", help="a training-free method instead: musc")
    parser.add_argument(
        "--baseline-opt", metavar="KEY=VALUE", action="append", default=[], help="a baseline config field"
    )
    parser.add_argument("--class-name", metavar="NAME", help="object name for the model's question")
    parser.add_argument(
        "--fpr",
        type=float,
        default=DEFAULT_FPR,
        help=f"target share of normal images above the threshold (default {DEFAULT_FPR})",
    )
    parser.add_argument(
        "--answer",
        action="store_true",
        help="--model: score in answer mode (as `vmad detect` without --no-answer) instead of segmentation "
        "only (VMAD-small's score does not depend on it by more than 0.003)",
    )
    parser.add_argument("--max-images", type=int, metavar="N", help="use only the first N images (sorted)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    parser.add_argument("--json", action="store_true", help="print the threshold file")
    parser.set_defaults(func=run)


def normal_images(targets: list[str], max_images: int | None) -> list[Path]:
    """The image files of the ``--normal`` arguments (folders recursively, sorted), in order, at most
    ``max_images``; VMADError for a missing path, a folder without images or fewer than 2 images."""
    from vmad.cli.detect import find_images
    from vmad.errors import VMADError

    files: list[Path] = []
    for target in targets:
        path = Path(target)
        found = find_images(path, path / ".vmad-no-output")[1]
        files += [f for f in found if f not in files]
    if max_images is not None:
        if max_images < 2:
            raise VMADError(f"--max-images must be >= 2, got {max_images}")
        files = files[:max_images]
    if len(files) < 2:
        where = ", ".join(targets)
        raise VMADError(f"calibration needs at least 2 normal images, found {len(files)} in {where}")
    return files


def run(args: argparse.Namespace) -> int:
    from vmad.errors import VMADError
    from vmad.infer.detector import Detector, DetectorConfig, resolve_model_path

    if not 0.0 < args.fpr < 0.5:
        raise VMADError(f"--fpr must be in (0, 0.5), got {args.fpr}")
    out = Path(args.out)
    if out.is_dir():
        raise VMADError(f"{out}: --out is a folder; give the threshold file's name")
    files = normal_images(args.normal, args.max_images)
    if args.baseline:
        from vmad.cli.eval import parse_options

        if args.answer:
            raise VMADError(f"--baseline {args.baseline} gives no text answers; leave out --answer")
        detector: object = Detector.from_baseline(args.baseline, **parse_options(args.baseline_opt))
    else:
        if args.baseline_opt:
            raise VMADError("--baseline-opt needs --baseline")
        model = args.model or "small"
        config = DetectorConfig(device=args.device).validate()
        config.torch_device()
        detector = Detector.from_pretrained(resolve_model_path(model), config=config)
        detector.name = model  # type: ignore[attr-defined]
    cal = detector.calibrate(  # type: ignore[attr-defined]
        [str(f) for f in files], class_name=args.class_name, fpr=args.fpr, answer=args.answer
    )
    cal.save(out)
    if args.json:
        print(json.dumps(cal.to_dict(), indent=2))
    else:
        st, units = cal.stats, ("log-odds " if cal.scale == "logit" else "")
        print(
            f"{len(files)} normal images: scores {min(cal.scores):.4g} .. {max(cal.scores):.4g} "
            f"({units}mean {st['mean']:.4g}, sd {st['std']:.3g}); image threshold {cal.image_threshold:.4g}, "
            f"mask threshold {cal.mask_threshold:.4g}; wrote {out}"
        )
        if cal.without_prior is not None:  # OURS: a model with a normality prior
            alone = cal.without_prior
            print(f"  the same images without a normality prior (used for an image that gets none, e.g. a "
                  f"single image): image threshold {alone['image_threshold']:.4g}, mask threshold "
                  f"{alone['mask_threshold']:.4g}")
        if not args.baseline and cal.image_threshold >= 1.0:
            print("note: the threshold is at or above 1, the highest possible score: every image will be "
                  "judged normal (the normal scores vary too much; use more or more alike images)")
    return 0
