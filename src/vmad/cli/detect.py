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

Large images: an image of more than ``--max-pixels`` pixels (default 4194304 = 2048 x 2048) is decoded at a
reduced size (integer factor) and the model runs on that; its mask and overlay are written at the image's
own size (upsampled), and its summary row records ``"downscaled": true`` and ``"processed_size": [h, w]``
(the size the model saw; ``false`` / None for the others, which are processed at full size as before).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from vmad.infer.detector import Detection, Detector, DetectorConfig

DEFAULT_OUT = "detect_output"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="anomaly masks, overlays, scores and answers for an image or a folder",
        description="Run a VMAD model on an image or on every image under a folder (recursively). Writes "
        "<name>_mask.png (0/255), <name>_overlay.png and summary.json to --out, where <name> is the image's "
        "path relative to the input folder with its extension (sub/a.jpg -> sub/a.jpg_mask.png; names equal "
        "but for letter case get a ~2, ~3 ... suffix). The default question is the paper's template with the "
        "object name (--class-name, else 'object'). --no-answer is the fast segmentation-only path (one "
        "forward per batch).",
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
    parser.add_argument(
        "--model",
        default="small",
        metavar="small|PATH",
        help="'small' (packaged weights) or a checkpoint folder (save_trainable output)",
    )
    parser.add_argument(
        "--answer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate a text answer (default) or segment only (--no-answer, fastest)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="mask = probability > T (default 0.5)")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


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
)


def run(args: argparse.Namespace) -> int:
    """``vmad detect``: check the options, find the images, load the detector once, detect batch by batch,
    then write summary.json and report."""
    from vmad.errors import VMADError
    from vmad.infer.detector import resolve_model_path

    config = _checked_config(args)
    weights = resolve_model_path(args.model)  # fail fast, before scanning and loading
    out_dir = Path(args.out)
    root, files = find_images(Path(args.input), out_dir)
    stems = output_stems(root, files)
    prepare_out_dir(out_dir)  # before the model loads: a bad --out must not cost the whole inference

    detector = _load_detector(weights, config, args.model)
    question = args.question
    if question is None:
        question = detector.default_question(args.class_name, args.answer)
    outputs = _ImageOutputs(args=args, out_dir=out_dir, files=files, stems=stems)
    _detect_in_batches(detector, outputs, config.batch_size)

    summary = _build_summary(args, weights, question, config, detector, outputs.rows)
    _write_summary(summary, out_dir, print_json=args.json)
    if summary["n_processed"] == 0:
        raise VMADError(
            f"no image could be processed ({summary['n_images']} failed; see {out_dir / 'summary.json'})"
        )
    return 0


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
    ``--alpha`` is outside [0, 1] or ``--question`` is empty."""
    from vmad.errors import VMADError
    from vmad.infer.detector import DetectorConfig

    config = DetectorConfig(
        threshold=args.threshold,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        max_pixels=getattr(args, "max_pixels", 4_194_304),
    ).validate()
    config.torch_device()  # e.g. --device cuda on a CPU-only torch: one error line, before any work
    if not 0.0 <= args.alpha <= 1.0:
        raise VMADError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.question is not None and not args.question.strip():
        raise VMADError("--question must not be empty (leave it out for the default question)")
    return config


def _load_detector(weights: Path, config: DetectorConfig, model_name: str) -> Detector:
    """The detector loaded from ``weights``, named after the ``--model`` option."""
    from vmad.infer.detector import Detector

    detector = Detector.from_pretrained(weights, config=config)
    detector.name = model_name
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
                small = overlay(image, detection.probability_map, detection.processed_mask, self.args.alpha)
                write_png_strips(self.out_dir / mask_path, _mask_strips(detection.mask))
                write_png_strips(self.out_dir / overlay_path, _upsampled_strips(small, detection.size))
            else:
                save_png(self.out_dir / mask_path, detection.mask)
                heat_map = overlay(image, detection.probability_map, detection.mask, self.args.alpha)
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
        )
        if not self.args.json:
            answer = f"  {detection.answer!r}" if detection.answer is not None else ""
            tqdm.write(
                f"{self.files[index]}  score {detection.anomaly_score:.4f}  "
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


def _detect_in_batches(detector: Detector, outputs: _ImageOutputs, batch_size: int) -> None:
    """Detect ``batch_size`` images at a time (progress bar unless --no-progress or a single image), saving
    each image's outputs as its batch is done."""
    from tqdm import tqdm

    args, n_files = outputs.args, len(outputs.files)
    bar = tqdm(total=n_files, unit="img", disable=True if args.no_progress or n_files == 1 else None)
    try:
        for start in range(0, n_files, batch_size):
            indices, images, sizes = outputs.read(
                start, min(start + batch_size, n_files), detector.config.max_pixels
            )
            detections = detector.detect(
                images, args.question, answer=args.answer, class_name=args.class_name, original_sizes=sizes
            )
            for index, image, detection in zip(indices, images, detections, strict=True):
                outputs.save(index, image, detection)
            bar.update(min(batch_size, n_files - start))
    finally:
        bar.close()


def _build_summary(
    args: argparse.Namespace,
    weights: Path,
    question: str,
    config: DetectorConfig,
    detector: Detector,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of summary.json: the run's settings, the counts and one row per image."""
    n_processed = sum(row["error"] is None for row in rows)
    return {
        "model": str(args.model),
        "weights": str(weights),
        "input": str(args.input),
        "question": question,
        "answer_mode": bool(args.answer),
        "threshold": config.threshold,
        "max_pixels": config.max_pixels,
        "score_rule": detector.model.config.score.rule,
        "paths": "mask and overlay paths are relative to this file's folder",
        "n_images": len(rows),
        "n_processed": n_processed,
        "n_failed": len(rows) - n_processed,
        "images": rows,
    }


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
