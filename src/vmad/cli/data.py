"""`vmad data` subcommands: ``inspect`` prints per-class counts of a dataset folder; ``build-riad`` writes
RIAD-format data from one or more datasets; ``make-procedural`` writes defect-free procedural images."""

from __future__ import annotations

import argparse
import json

from vmad.data.dataset import (
    DATA_FORMATS,
    FORMAT_ALIASES,
    SPLIT_ORDER,
    DataOptions,
    data_options,
    load_dataset,
)
from vmad.data.folder import FolderConfig
from vmad.errors import ConfigError

AUTO_FORMAT = "auto"


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """``--mask-name`` and ``--data-opt``: the reader options, the same on every command that reads a
    dataset (``data inspect``, ``data build-riad``, ``eval``; ``train`` takes them as ``data.options``)."""
    parser.add_argument(
        "--mask-name",
        metavar="TEMPLATE",
        help=f"folder format: mask file name template over the image's {{stem}}, {{name}}, {{suffix}} "
        f"(default {FolderConfig.mask_name}; MVTec-style masks: '{{stem}}_mask.png')",
    )
    parser.add_argument(
        "--data-opt",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="a reader option (repeatable): folder.{images_dir,masks_dir,mask_name,normal_dirs,default_split,"
        "mask_spec,unlabelled_defect_type}, magnetic_tile.test_fraction, neu_seg.defect_types_from_masks",
    )


def options_from_args(args: argparse.Namespace) -> DataOptions:
    """The :class:`DataOptions` of ``--mask-name`` / ``--data-opt``."""
    return data_options(getattr(args, "mask_name", None), getattr(args, "data_opt", []) or [])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect datasets")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = actions.add_parser(
        "inspect",
        help="per-class counts of a dataset (format detected when unambiguous)",
        description="Per-class counts of normal/anomalous images, masks and defect types. Reads file "
        "headers (image/mask sizes are checked); --verify also decodes every image and mask.",
    )
    inspect.add_argument("path", help="dataset root or single class folder")
    inspect.add_argument(
        "--format", choices=sorted(DATA_FORMATS + tuple(FORMAT_ALIASES)), help="dataset layout"
    )
    inspect.add_argument("--split", choices=SPLIT_ORDER, help="count only this split")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--verify", action="store_true", help="fully decode every image and mask")
    add_data_options(inspect)
    inspect.set_defaults(func=_inspect)
    _register_build_riad(actions)
    _register_make_procedural(actions)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _inspect(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.path, args.format, options_from_args(args))
    dataset.check(decode=args.verify, split=args.split)
    counts = dataset.counts(split=args.split)
    if args.json:
        payload = {"format": dataset.format, "classes": {name: c.as_dict() for name, c in counts.items()}}
        print(json.dumps(payload, indent=2))
        return 0
    split = args.split or f"all ({', '.join(dataset.splits())})"
    print(f"format: {dataset.format}   root: {dataset.root}   split: {split}")
    rows = [("class", "normal", "anomalous", "masks", "defect types")]
    for name, c in counts.items():
        types = ", ".join(f"{t} {n}" for t, n in sorted(c.defect_types.items())) or "-"
        rows.append((name, str(c.normal), str(c.anomalous), str(c.masks), types))
    if len(counts) > 1:
        total = [sum(getattr(c, k) for c in counts.values()) for k in ("normal", "anomalous", "masks")]
        rows.append(("total", *(str(v) for v in total), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 4)] + [row[4]]
        print("  ".join(cells).rstrip())
    return 0


def _register_build_riad(actions: argparse._SubParsersAction) -> None:
    build = actions.add_parser(
        "build-riad",
        help="write a RIAD-format dataset (real + synthetic defects, templated text) from datasets",
        description="Write a RIAD-format dataset (docs/riad_format.md) from one or more datasets the readers "
        "support: their normal images, their anomalous images with their masks as COCO RLE, K synthetic "
        "defects on each used normal image, and templated description / impact / suggestion answers. "
        "Several --from sources go into one RIAD root (a class name in two sources is an error). "
        "Deterministic for a seed; built in OUT.tmp-XXXX and renamed (what a killed earlier run left beside "
        "OUT is repaired first: an interrupted --overwrite gets its old folder back).",
    )
    build.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="PATH",
        help="source dataset folder (repeat for several sources)",
    )
    build.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)"
    )
    build.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=[AUTO_FORMAT, *sorted(DATA_FORMATS + tuple(FORMAT_ALIASES))],
        help="source layout (default: detect); once for every source, or once per --from in the same order "
        f"('{AUTO_FORMAT}' = detect that one)",
    )
    build.add_argument("--split", choices=SPLIT_ORDER, help="use only this source split (default: all)")
    build.add_argument(
        "--synthetic-per-normal", type=int, default=1, metavar="K", help="synthetic defects per normal image"
    )
    build.add_argument("--max-images", type=int, metavar="N", help="at most N source images per class")
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_options(build)
    build.set_defaults(func=_build_riad)


def _register_make_procedural(actions: argparse._SubParsersAction) -> None:
    make = actions.add_parser(
        "make-procedural",
        help="write defect-free procedural surfaces and parts (folder format) for build-riad",
        description="Write COUNT procedural textured surfaces and COUNT textured parts on a plain background "
        "(classes 'surface' and 'part', train split, folder format) as extra normal images on which "
        "build-riad paints synthetic defects. Deterministic for a seed; built in OUT.tmp-XXXX and renamed.",
    )
    make.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)"
    )
    make.add_argument("--count", type=int, default=200, help="images per class (default 200)")
    make.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    make.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(func=_make_procedural)


def _make_procedural(args: argparse.Namespace) -> int:
    from vmad.data.procedural import CLASSES, ProceduralConfig, write_procedural

    cfg = ProceduralConfig(count=args.count, size=args.size, seed=args.seed)
    out = write_procedural(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {cfg.count} images of {cfg.size}x{cfg.size} px per class ({', '.join(CLASSES)}) to {out}")
    return 0


def source_formats(sources: list[str], formats: list[str] | None) -> list[str | None]:
    """One format (None = detect) per source from the repeated ``--format`` values: none = detect all, one =
    the same for all, else exactly one per ``--from`` in order."""
    values = [None if f == AUTO_FORMAT else f for f in formats or []]
    if not values:
        return [None] * len(sources)
    if len(values) == 1:
        return values * len(sources)
    if len(values) != len(sources):
        raise ConfigError(
            f"--format given {len(values)} times for {len(sources)} --from sources: give it once (for all) "
            "or once per --from"
        )
    return values


def _build_riad(args: argparse.Namespace) -> int:
    from vmad.data.build_riad import BuildConfig, build_riad

    cfg = BuildConfig(
        synthetic_per_normal=args.synthetic_per_normal,
        max_images=args.max_images,
        seed=args.seed,
        split=args.split,
    )
    summary = build_riad(
        args.sources,
        args.out,
        cfg,
        overwrite=args.overwrite,
        progress=not args.quiet,
        options=options_from_args(args),
        formats=source_formats(args.sources, args.formats),
    )
    print("\n".join(summary.lines()))
    return 0
