"""``vmad detect IMAGE_OR_FOLDER``: masks, overlays, scores and answers for images, model loaded once.

Outputs in ``--out DIR``: ``<name>_mask.png`` (0/255), ``<name>_overlay.png`` and ``summary.json`` (per
image: file, score, mask/overlay paths relative to DIR, answer, error). ``<name>`` is the image's path
relative to the input folder, file extension included (``sub/good.jpg`` -> ``sub/good.jpg_mask.png``), so
``good.jpg``, ``good.png`` and ``good_jpg.png`` keep distinct outputs. Names that differ only by letter case
(``x.png`` / ``x.PNG``; they are one file on case-insensitive file systems) get a suffix after the first, in
sorted order: ``x.png_mask.png``, then ``x.PNG~2_mask.png``. No two images ever share an output file (checked
before anything is written), and each summary row names exactly the files written for that image.

The output folder is created and checked writable (a probe file) before the model loads; the question, when
given, must not be empty. Unreadable images are reported on stderr, listed with their error and skipped; the
exit status is non-zero only when no image could be processed.

Methods: ``--model small|PATH`` (VMAD) or ``--baseline musc`` (training-free, no text answers; its maps are
patch-feature distances). MuSc scores the images of a folder against each other, so it needs a folder of at
least 2 images, or ``--reference DIR`` (normal images of the object, at least 2) or a MuSc threshold file,
whose images are then the references (:mod:`vmad.infer.baseline`). A VMAD model trained with the OURS
normality prior (``mask_decoder.prior_prompt``) gets each image's prior by mutual scoring over the whole
folder and the ``--reference`` images; summary.json says which per image (``prior``). A folder of more than
``--group-size`` images (default 200) is scored in interleaved groups of at most that many, each read, scored
and written before the next (memory stays bounded; 0 = all at once).

Verdicts: with ``--threshold-file FILE`` (written by ``vmad calibrate``) or ``--image-threshold T`` each
image gets ``"verdict": "anomalous"`` (score > T) or ``"normal"``, and summary.json records the thresholds
used and where they came from; without either the verdict is null. A threshold file also sets the mask
threshold; ``--threshold`` given explicitly wins over it.

Large images: an image of more than ``--max-pixels`` pixels (default 4194304 = 2048 x 2048) is decoded at a
reduced size (integer factor) and the model runs on that; its mask and overlay are written at the image's
own size (upsampled), and its summary row records ``"downscaled": true`` and ``"processed_size": [h, w]``
(the size the model saw; ``false`` / None for the others, which are processed at full size as before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmad.cli.options import add_answer_verdict_opt, add_baseline_opt, add_prior_opt, add_refine_opt

if TYPE_CHECKING:
    import numpy as np

    from vmad.infer.baseline import BaselineDetector
    from vmad.infer.detector import Detection, Detector, DetectorConfig

DEFAULT_OUT = "detect_output"
#: images scored against each other at most (normality priors, MuSc without references): MuSc's group size
DEFAULT_GROUP_SIZE = 200


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="anomaly masks, overlays, scores and answers for an image or a folder",
        description="Run a VMAD model on an image or on every image under a folder (recursively). Writes "
        "<name>_mask.png (0/255), <name>_overlay.png and summary.json to --out, where <name> is the image's "
        "path relative to the input folder with its extension (sub/a.jpg -> sub/a.jpg_mask.png; names equal "
        "but for letter case get a ~2, ~3 ... suffix). The default question is the paper's template with the "
        "object name (--class-name, else 'object'). --no-answer is the fast segmentation-only path (one "
        "forward per batch). Answers are on by default here for --model, while the Python API "
        "(Detector.detect) defaults to answer=False; --baseline methods give no answers. A threshold file "
        "from `vmad calibrate` (--threshold-file) adds a verdict per image.",
    )
    parser.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images")
    parser.add_argument(
        "--question",
        help="question to ask, as given (must not be empty; default: the paper's template); summary.json "
        "records the question asked",
    )
    parser.add_argument("--class-name", metavar="NAME", help="object name for the default question")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true", help="print summary.json, not one line per image")
    _add_method_options(parser)
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per forward (4)")
    parser.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="answer length limit")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay heat-map opacity (0.5)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=4_194_304,
        metavar="N",
        help="images with more than N pixels (H*W) are decoded and processed at a reduced size; mask and "
        "overlay are still written at the image's size (default 4194304 = 2048x2048)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    _add_workers_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes decoding the next images while the current batch runs (default 1; 0 = none)",
    )


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """--model / --baseline (and its options), --answer and the thresholds."""
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--model",
        default=None,
        metavar="small|PATH",
        help="'small' (packaged weights, the default), a checkpoint folder (save_trainable output) or a "
        "`vmad train` output folder (its final/)",
    )
    who.add_argument("--baseline", metavar="NAME", help="a training-free method instead of a model: musc")
    add_baseline_opt(parser)
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="a folder of normal images of the object: --baseline musc scores against them (at least 2; lets "
        "MuSc score a single image); a model trained with a normality prior (OURS) uses them with the folder "
        "for its prior",
    )
    parser.add_argument(
        "--answer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate a text answer (the default for --model; the Python API's Detector.detect defaults to "
        "answer=False) or segment only (--no-answer, fastest; the only mode of --baseline)",
    )
    add_answer_verdict_opt(parser)
    add_prior_opt(parser)
    add_refine_opt(parser)
    parser.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        metavar="N",
        help="images scored against each other (the normality prior of a model, --baseline musc without "
        f"--reference): a larger folder is split into interleaved groups of at most N (default "
        f"{DEFAULT_GROUP_SIZE}, MuSc's group size), each read, scored and written before the next, so memory "
        "stays bounded; 0 = the whole folder at once",
    )
    parser.add_argument(
        "--threshold-file",
        metavar="FILE",
        help="a threshold file from `vmad calibrate` (same model or baseline): verdict per image, mask "
        "threshold",
    )
    parser.add_argument(
        "--image-threshold",
        type=float,
        metavar="T",
        help="verdict threshold on the image score (anomalous when score > T); overrides the file's",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="mask = map > T (default: the threshold file's, else 0.5 for --model and the baseline's own "
        "rule for --baseline)",
    )


# ------------------------------------------------------------------------------------------ inputs


def find_images(target: Path, out_dir: Path) -> tuple[Path, list[Path]]:
    """``(root, files)``: a single file as given, or every visible image file under a folder (recursive,
    sorted, hidden files and folders and anything under ``out_dir`` skipped)."""
    from vmad.data.io import IMAGE_EXTENSIONS
    from vmad.errors import VMADError

    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise VMADError(f"{target}: no such image file or folder")
    root, out = target.resolve(), out_dir.resolve()
    if out == root:
        raise VMADError(f"--out {out_dir} is the input folder; choose another folder for the outputs")
    files = []
    for p in sorted(target.rglob("*")):
        rel = p.relative_to(target)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.is_file() and not p.resolve().is_relative_to(out):
            files.append(p)
    if not files:
        raise VMADError(f"{target}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return target, files


OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")


def output_stems(root: Path, files: Sequence[Path]) -> list[Path]:
    """Relative output name per file: its path relative to ``root``, extension kept (``sub/good.jpg``).
    Paths equal but for letter case (one file on case-insensitive file systems) get ``~2``, ``~3`` ... after
    the first (``x.PNG~2``); a suffixed name ends in no image extension, so it cannot equal a real one."""
    stems: list[Path] = []
    taken: set[str] = set()
    for p in files:
        stem = p.relative_to(root)
        n = 1
        while _case_key(stem) in taken:
            n += 1
            stem = p.relative_to(root).with_name(f"{p.name}~{n}")
        taken.add(_case_key(stem))
        stems.append(stem)
    check_distinct_outputs(stems)
    return stems


def _case_key(path: Path) -> str:
    return path.as_posix().casefold()


def output_paths(stem: Path) -> tuple[Path, ...]:
    """The files written for one image, relative to the output folder (mask, overlay)."""
    return tuple(stem.with_name(stem.name + suffix) for suffix in OUTPUT_SUFFIXES)


def check_distinct_outputs(stems: Sequence[Path]) -> None:
    """VMADError unless every output file (and folder) is distinct from every other, ignoring letter case,
    and none is summary.json: no image's result may overwrite another's."""
    from vmad.errors import VMADError

    owner: dict[str, int] = {_case_key(Path("summary.json")): -1}
    folders: dict[str, int] = {}
    for i, stem in enumerate(stems):
        for path in output_paths(stem):
            key = _case_key(path)
            clash = owner.get(key, folders.get(key))
            if clash is not None:
                other = "summary.json" if clash == -1 else f"the outputs of image {clash + 1}"
                raise VMADError(f"output {path.as_posix()} of image {i + 1} would overwrite {other}")
            owner[key] = i
        for parent in stem.parents:
            key = _case_key(parent)
            if key in owner:
                raise VMADError(f"output folder {parent.as_posix()} of image {i + 1} is an output file")
            folders.setdefault(key, i)


# ------------------------------------------------------------------------------------------ run


# The per-image fields of summary.json, after "file" (None until filled in).
_IMAGE_FIELDS: tuple[str, ...] = (
    "score",
    "mask",
    "overlay",
    "answer",
    "mask_description",
    "error",
    "mask_pixels",
    "mask_from",
    "height",
    "width",
    "downscaled",
    "processed_size",
    "verdict",
    "mask_threshold",
    "prior",
    "score_logit",
)


def run(args: argparse.Namespace) -> int:
    """``vmad detect``: check the options, find the images, load the detector once (and its thresholds),
    detect batch by batch, then write summary.json and report."""
    from vmad.errors import VMADError
    from vmad.infer.detector import resolve_model_path

    _resolve_method(args)
    config = _checked_config(args)
    # fail fast, before scanning and loading
    weights = None if args.baseline else resolve_model_path(args.model)
    out_dir = Path(args.out)
    root, files = find_images(Path(args.input), out_dir)
    stems = output_stems(root, files)
    references = find_images(Path(args.reference), out_dir)[1] if args.reference else None
    prepare_out_dir(out_dir)  # before the model loads: a bad --out must not cost the whole inference

    detector = _load_detector(weights, config, args, references)
    takes_prior = not args.baseline and detector.model.config.mask_decoder.prior_prompt
    if getattr(args, "prior", None) and not takes_prior:
        who = "a baseline" if args.baseline else f"model {args.model!r}"
        raise VMADError(f"--prior: {who} takes no normality prior (only models with "
                        "mask_decoder.prior_prompt do)")
    refiner = not args.baseline and detector.model.config.mask_decoder.refiner
    if not getattr(args, "refine", True) and not refiner:
        who = "a baseline" if args.baseline else f"model {args.model!r}"
        raise VMADError(f"--no-refine: {who} has no mask refiner (only models with mask_decoder.refiner do)")
    if references and not args.baseline and not detector.uses_priors:
        raise VMADError(f"--reference: model {args.model!r} takes no normality prior (references are used by "
                        "--baseline and by models trained with mask_decoder.prior_prompt)")
    question = args.question
    if question is None and not args.baseline:
        question = detector.default_question(args.class_name, args.answer)
    outputs = _ImageOutputs(args=args, out_dir=out_dir, files=files, stems=stems)
    zero_shot = args.baseline and not detector.has_references
    from vmad.baselines.musc import interleaved_groups

    scored_together = zero_shot or (not args.baseline and detector.uses_priors)
    groups = interleaved_groups(len(files), args.group_size if scored_together else 0)
    if len(groups) > 1:
        print(f"{len(files)} images: scored against each other in {len(groups)} interleaved groups of at "
              f"most {args.group_size} (--group-size)", file=sys.stderr)
    with _progress(args, len(files)) as bar:
        for group in groups:  # each group scored (priors or MuSc) and written before the next is read
            priors = None if args.baseline else _folder_priors(detector, files, references, group)
            _detect_in_batches(detector, outputs, len(group) if zero_shot else config.batch_size, priors,
                               group, bar)

    summary = _build_summary(args, weights, question, config, detector, outputs.rows)
    _write_summary(summary, out_dir, print_json=args.json)
    if summary["n_processed"] == 0:
        raise VMADError(
            f"no image could be processed ({summary['n_images']} failed; see {out_dir / 'summary.json'})"
        )
    return 0


def _resolve_method(args: argparse.Namespace) -> None:
    """Fill in the method-dependent defaults (--model small; answers on for a model, off for a baseline);
    VMADError for options that do not fit the method."""
    from vmad.errors import VMADError

    if args.baseline is None:
        args.model = args.model or "small"
        args.answer = True if args.answer is None else args.answer
        if args.baseline_opt:
            raise VMADError("--baseline-opt needs --baseline")
        return
    if args.answer:
        raise VMADError(f"--baseline {args.baseline} gives no text answers; leave out --answer")
    if args.question is not None:
        raise VMADError(f"--baseline {args.baseline} takes no question; leave out --question")
    args.answer = False


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written in it (a probe file, removed at once);
    VMADError ``<path>: <problem>`` when it is a file, cannot be created or is not writable."""
    import os
    import tempfile

    from vmad.errors import VMADError

    if out_dir.exists() and not out_dir.is_dir():
        raise VMADError(f"{out_dir}: --out is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VMADError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".vmad-write-probe-", dir=out_dir)
    except OSError as exc:
        raise VMADError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def _checked_config(args: argparse.Namespace) -> DetectorConfig:
    """The validated detector settings from the options (the device checked usable); VMADError when
    ``--alpha`` is outside [0, 1] or ``--question`` is empty. For a baseline the mask threshold is checked
    by the baseline's own settings (its maps are not probabilities)."""
    import math

    from vmad.errors import VMADError
    from vmad.infer.detector import DetectorConfig

    model_threshold = args.threshold if (args.threshold is not None and not args.baseline) else 0.5
    config = DetectorConfig(
        threshold=model_threshold,
        image_threshold=args.image_threshold,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        max_pixels=getattr(args, "max_pixels", 4_194_304),
        answer_verdict=getattr(args, "answer_verdict", "model"),
        prior=getattr(args, "prior", None) or "folder",
        refine=getattr(args, "refine", True),
    ).validate()
    config.torch_device()  # e.g. --device cuda on a CPU-only torch: one error line, before any work
    if not 0.0 <= args.alpha <= 1.0:
        raise VMADError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.question is not None and not args.question.strip():
        raise VMADError("--question must not be empty (leave it out for the default question)")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise VMADError(f"--threshold must be a finite number, got {args.threshold}")
    if getattr(args, "workers", 0) < 0:
        raise VMADError(f"--workers must be >= 0, got {args.workers}")
    if args.group_size < 0 or args.group_size == 1:
        raise VMADError(f"--group-size must be 0 (the whole folder) or at least 2 (images are scored against "
                        f"each other), got {args.group_size}")
    return config


def _load_detector(
    weights: Path | None, config: DetectorConfig, args: argparse.Namespace, references: list[Path] | None
) -> Detector | BaselineDetector:
    """The detector named by ``--model`` (loaded from ``weights``) or ``--baseline``, with the threshold
    file applied, then the explicit ``--image-threshold`` / ``--threshold`` on top."""
    from dataclasses import replace

    from vmad.infer.detector import Detector

    if args.baseline:
        from vmad.cli.eval import parse_options

        options = {**parse_options(args.baseline_opt), "max_pixels": config.max_pixels}
        detector: Any = Detector.from_baseline(args.baseline, references=references, **options)
    else:
        detector = Detector.from_pretrained(weights, config=config)  # type: ignore[arg-type]
        detector.name = args.model
    if args.threshold_file:
        detector.load_threshold_file(args.threshold_file)
    explicit: dict[str, float] = {}
    if args.image_threshold is not None:  # for every image, with a normality prior or without
        explicit["image_threshold"] = args.image_threshold
        if not args.baseline:
            explicit["image_threshold_without_prior"] = args.image_threshold
    if args.threshold is not None:
        explicit["mask_threshold" if args.baseline else "threshold"] = args.threshold
        if not args.baseline:
            explicit["threshold_without_prior"] = args.threshold
    if explicit:
        detector.config = replace(detector.config, **explicit).validate()
    return detector


@dataclass
class _ImageOutputs:
    """The images of one run, their output stems and their summary rows (filled in as images are done)."""

    args: argparse.Namespace
    out_dir: Path
    files: list[Path]
    stems: list[Path]
    rows: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = [{"file": str(p), **dict.fromkeys(_IMAGE_FIELDS)} for p in self.files]

    def skip(self, index: int, message: str) -> None:
        """Record ``message`` as image ``index``'s error and report it on stderr."""
        from tqdm import tqdm

        self.rows[index]["error"] = message
        tqdm.write(f"skipped: {message}", file=sys.stderr)

    def read(
        self, start: int, stop: int, max_pixels: int | None = None
    ) -> tuple[list[int], list[np.ndarray], list[tuple[int, int]]]:
        """Indices, pixels and file sizes (H, W) of the readable images among ``files[start:stop]``; the
        others are skipped. Images above ``max_pixels`` are decoded at a reduced size."""
        from vmad.data.io import read_image_bounded
        from vmad.errors import DataError

        indices, images, sizes = [], [], []
        for index in range(start, stop):
            try:
                pixels, size = read_image_bounded(self.files[index], max_pixels)
            except DataError as exc:
                self.skip(index, str(exc))
                continue
            images.append(pixels)
            sizes.append(size)
            indices.append(index)
        return indices, images, sizes

    def save(self, index: int, image: np.ndarray, detection: Detection) -> None:
        """Write image ``index``'s mask and overlay, fill its summary row; print a line unless --json."""
        from tqdm import tqdm

        from vmad.infer.render import overlay, save_png

        mask_path, overlay_path = output_paths(self.stems[index])
        try:
            if detection.downscaled:  # written strip by strip; overlay drawn small, then upsampled
                small = overlay(image, detection.heat_map(), detection.processed_mask, self.args.alpha)
                write_png_strips(self.out_dir / mask_path, _mask_strips(detection.mask))
                write_png_strips(self.out_dir / overlay_path, _upsampled_strips(small, detection.size))
            else:
                save_png(self.out_dir / mask_path, detection.mask)
                heat_map = overlay(image, detection.heat_map(), detection.mask, self.args.alpha)
                save_png(self.out_dir / overlay_path, heat_map)
        except OSError as exc:
            self.skip(index, f"{self.files[index]}: cannot write outputs ({exc})")
            return
        self.rows[index].update(
            score=round(detection.anomaly_score, 6),
            mask=mask_path.as_posix(),
            overlay=overlay_path.as_posix(),
            answer=detection.answer,
            mask_description=detection.mask_description,
            mask_pixels=int(detection.mask.sum()),
            mask_from=detection.mask_from,
            height=int(detection.mask.shape[0]),
            width=int(detection.mask.shape[1]),
            downscaled=detection.downscaled,
            processed_size=list(detection.processed_size) if detection.processed_size else None,
            verdict=detection.verdict,
            mask_threshold=detection.mask_threshold,
            prior=getattr(detection, "prior", None),
            score_logit=None if detection.score_logit is None else round(detection.score_logit, 4),
        )
        if not self.args.json:
            answer = f"  {detection.answer!r}" if detection.answer is not None else ""
            verdict = f"  {detection.verdict}" if detection.verdict is not None else ""
            odds = f" (log-odds {detection.score_logit:.2f})" if detection.score_logit is not None else ""
            tqdm.write(
                f"{self.files[index]}  score {detection.anomaly_score:.4f}{odds}{verdict}  "
                f"mask {100.0 * detection.mask.mean():.1f}%{answer}"
            )


_STRIP_ROWS = 512


def _mask_strips(mask: np.ndarray) -> Iterator[np.ndarray]:
    """(rows, W) uint8 0/255 strips of a bool mask."""
    import numpy as np

    for y0 in range(0, mask.shape[0], _STRIP_ROWS):
        yield np.multiply(mask[y0 : y0 + _STRIP_ROWS], 255, dtype=np.uint8)


def _upsampled_strips(small: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """(rows, W, 3) uint8 strips of ``small`` bilinearly upsampled to ``size`` (H, W): each strip is the
    matching rows of one full PIL resize (``box``), so no full-size image is held."""
    import numpy as np
    from PIL import Image

    height, width = size
    im = Image.fromarray(small)
    sy = small.shape[0] / height
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        box = (0.0, y0 * sy, float(small.shape[1]), y1 * sy)
        yield np.asarray(im.resize((width, y1 - y0), Image.Resampling.BILINEAR, box=box))


def write_png_strips(path: Path, strips: Iterable[np.ndarray]) -> Path:
    """Write an 8-bit greyscale ((rows, W) strips) or RGB ((rows, W, 3) strips) PNG from row strips,
    streaming (zlib level 6, no row filter), atomically like ``render.save_png``; used for downscaled
    images, whose outputs are written at the image's (large) size."""
    import struct
    import zlib

    import numpy as np

    from vmad.atomic import atomic_path

    def chunk(fh: Any, kind: bytes, data: bytes) -> None:
        fh.write(struct.pack(">I", len(data)) + kind + data)
        fh.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.parent.mkdir(parents=True, exist_ok=True)
    iterator = iter(strips)
    first = next(iterator)
    colour = 2 if first.ndim == 3 else 0
    width = first.shape[1]
    rows = [first]
    height = 0
    with atomic_path(path, fsync=False) as tmp, open(tmp, "xb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        header_at = fh.tell()
        chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, colour, 0, 0, 0))  # height patched below
        comp = zlib.compressobj(6)
        for strip in _chain(rows, iterator):
            height += strip.shape[0]
            raw = strip.reshape(strip.shape[0], -1)
            lines = np.zeros((raw.shape[0], raw.shape[1] + 1), dtype=np.uint8)  # column 0: filter type 0
            lines[:, 1:] = raw
            data = comp.compress(lines)
            if data:
                chunk(fh, b"IDAT", data)
        chunk(fh, b"IDAT", comp.flush())
        chunk(fh, b"IEND", b"")
        fh.seek(header_at)
        chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
    return path


def _chain(*parts: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for part in parts:
        yield from part


@contextlib.contextmanager
def _progress(args: argparse.Namespace, n_files: int) -> Iterator[Any]:
    """One progress bar over the run (off with --no-progress or a single image)."""
    from tqdm import tqdm

    bar = tqdm(total=n_files, unit="img", disable=True if args.no_progress or n_files == 1 else None)
    try:
        yield bar
    finally:
        bar.close()


def _folder_priors(
    detector: Detector, files: list[Path], references: list[Path] | None, group: Sequence[int]
) -> dict[int, Any] | None:
    """OURS: for a model that takes a normality prior, each readable image's prior by mutual scoring over
    the images ``group`` of ``files`` (the folder or one of its interleaved groups) and the
    ``--reference`` images, by file index; None for other models."""
    from vmad.data.io import read_image_bounded
    from vmad.errors import VMADError

    if not detector.uses_priors:
        return None
    limit = detector.config.max_pixels
    readable: dict[int, Any] = {}
    for i in group:
        try:
            readable[i] = read_image_bounded(files[i], max_pixels=limit)[0]
        except (OSError, ValueError, VMADError):
            continue  # reported when its batch is read
    refs = [read_image_bounded(p, max_pixels=limit)[0] for p in references or []]
    if not readable:
        return None
    if len(readable) + len(refs) > 1 and detector.config.prior != "self":
        print(f"normality prior: scoring {len(readable)} image(s)"
              f"{f' and {len(refs)} reference(s)' if refs else ''} against each other first (MuSc; "
              "--prior off skips it)", file=sys.stderr)
    priors = detector.normality_priors(list(readable.values()), refs)
    if priors is None:
        return None
    if priors.kinds is not None and (alone := int((priors.kinds < 0).sum())):
        how = ("a prior from their own patches only (prior 'self' in summary.json)" if priors.image_modes
               and "self" in priors.image_modes else "none (prior 'none' in summary.json)")
        print(f"normality prior: {alone} of {len(readable)} image(s) unlike every other image of the folder "
              f"get {how}; a folder should hold one kind of object", file=sys.stderr)
    return {i: priors.subset([k]) for k, i in enumerate(readable)}


def _detect_in_batches(
    detector: Detector,
    outputs: _ImageOutputs,
    batch_size: int,
    priors: dict[int, Any] | None,
    group: Sequence[int],
    bar: Any,
) -> None:
    """Detect the files ``group`` (indices into ``outputs.files``) ``batch_size`` at a time, saving each
    image's outputs as its batch is done; ``priors``: :func:`_folder_priors`; ``bar``: the run's progress."""
    import functools

    from vmad.baselines.prior import join_priors
    from vmad.data.io import read_image_bounded
    from vmad.data.prefetch import prefetch

    args = outputs.args
    read = functools.partial(read_image_bounded, max_pixels=detector.config.max_pixels)
    workers = getattr(args, "workers", 0)
    files = [outputs.files[i] for i in group]
    # the next batches are decoded by `workers` processes while this one runs
    for batch in prefetch(files, read, batch_size, workers):
        indices, images, sizes = [], [], []
        for position, loaded, error in batch:
            index = group[position]
            if error is not None:
                outputs.skip(index, str(error))
                continue
            indices.append(index)
            images.append(loaded[0])
            sizes.append(loaded[1])
        extra = {} if priors is None else {"priors": join_priors([priors[i] for i in indices])}
        detections = detector.detect(
            images, args.question, answer=args.answer, class_name=args.class_name, original_sizes=sizes,
            **extra,
        ) if images else []
        for index, image, detection in zip(indices, images, detections, strict=True):
            outputs.save(index, image, detection)
        bar.update(len(batch))


def _build_summary(
    args: argparse.Namespace,
    weights: Path | None,
    question: str | None,
    config: DetectorConfig,
    detector: Detector | BaselineDetector,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of summary.json: the run's settings, the thresholds and verdict counts, and one row per
    image."""
    n_processed = sum(row["error"] is None for row in rows)
    verdicts = [row["verdict"] for row in rows if row["error"] is None and row["verdict"] is not None]
    baseline = bool(args.baseline)
    calibration = detector.calibration
    return {
        "model": None if baseline else str(args.model),
        "baseline": args.baseline,
        "weights": None if weights is None else str(weights),
        "input": str(args.input),
        "question": question,
        "answer_mode": bool(args.answer),
        "threshold": None if baseline else detector.config.threshold,
        "mask_threshold_rule": _mask_rule(detector, args),
        "image_threshold": detector.config.image_threshold,
        # OURS, a model with a normality prior calibrated by `vmad calibrate`: for images that get none
        "image_threshold_without_prior": None if baseline else detector.config.image_threshold_without_prior,
        "threshold_file": str(args.threshold_file) if args.threshold_file else None,
        "threshold_source": _threshold_source(args, calibration),
        "calibration": None if calibration is None else {
            k: calibration.to_dict()[k] for k in ("rule", "fpr", "stats", "class_name", "created")},
        "verdicts": {"anomalous": verdicts.count("anomalous"), "normal": verdicts.count("normal")}
        if detector.config.image_threshold is not None else None,
        "references": [str(p) for p in getattr(detector, "reference_sources", [])] or None,
        "max_pixels": config.max_pixels,
        # OURS: whether the masks are the refiner's (None: the method has no mask refiner)
        "refine": detector.config.refine if not baseline and detector.model.config.mask_decoder.refiner
        else None,
        "score_rule": "max of the MuSc map (module vmad.infer.baseline)" if baseline
        else detector.model.config.score.rule,
        "paths": "mask and overlay paths are relative to this file's folder",
        "n_images": len(rows),
        "n_processed": n_processed,
        "n_failed": len(rows) - n_processed,
        "images": rows,
    }


def _threshold_source(args: argparse.Namespace, calibration: Any) -> str | None:
    """Where the verdict threshold came from: ``--image-threshold``, the threshold file, or None."""
    if args.image_threshold is not None:
        return "--image-threshold"
    if calibration is not None:
        return f"threshold file {args.threshold_file}" if args.threshold_file else "calibration"
    return None


def _mask_rule(detector: Any, args: argparse.Namespace) -> str:
    """How the mask threshold was chosen (the value itself is in each image's row)."""
    if args.threshold is not None:
        return "--threshold"
    if detector.calibration is not None:
        return "threshold file (the calibrated image threshold)"
    if args.baseline:
        return ("the highest leave-one-out score of the references" if detector.has_references
                else "the median image score of the folder's images")
    return "default 0.5"


def _write_summary(summary: dict[str, Any], out_dir: Path, print_json: bool) -> None:
    """Write ``out_dir``/summary.json, then print it (``print_json``) or a one-line report."""
    from vmad.atomic import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "summary.json", summary, allow_nan=False, fsync=False)
    if print_json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        n_processed, n_images = summary["n_processed"], summary["n_images"]
        print(
            f"wrote {n_processed} mask(s) and overlay(s) and summary.json to {out_dir}"
            + (f"; {n_images - n_processed} image(s) skipped" if n_processed < n_images else "")
        )
