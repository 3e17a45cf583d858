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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
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

    def read(self, start: int, stop: int) -> tuple[list[int], list[np.ndarray]]:
        """Indices and pixels of the readable images among ``files[start:stop]``; the others are skipped."""
        from vmad.data import read_image
        from vmad.errors import DataError

        indices, images = [], []
        for index in range(start, stop):
            try:
                images.append(read_image(self.files[index]))
                indices.append(index)
            except DataError as exc:
                self.skip(index, str(exc))
        return indices, images

    def save(self, index: int, image: np.ndarray, detection: Detection) -> None:
        """Write image ``index``'s mask and overlay, fill its summary row; print a line unless --json."""
        from tqdm import tqdm

        from vmad.infer.render import overlay, save_png

        mask_path, overlay_path = output_paths(self.stems[index])
        try:
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
        )
        if not self.args.json:
            answer = f"  {detection.answer!r}" if detection.answer is not None else ""
            tqdm.write(
                f"{self.files[index]}  score {detection.anomaly_score:.4f}  "
                f"mask {100.0 * detection.mask.mean():.1f}%{answer}"
            )


def _detect_in_batches(detector: Detector, outputs: _ImageOutputs, batch_size: int) -> None:
    """Detect ``batch_size`` images at a time (progress bar unless --no-progress or a single image), saving
    each image's outputs as its batch is done."""
    from tqdm import tqdm

    args, n_files = outputs.args, len(outputs.files)
    bar = tqdm(total=n_files, unit="img", disable=True if args.no_progress or n_files == 1 else None)
    try:
        for start in range(0, n_files, batch_size):
            indices, images = outputs.read(start, min(start + batch_size, n_files))
            detections = detector.detect(
                images, args.question, answer=args.answer, class_name=args.class_name
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
