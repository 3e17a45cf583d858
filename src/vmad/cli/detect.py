"""``vmad detect IMAGE_OR_FOLDER``: masks, overlays, scores and answers for images, model loaded once.

Outputs in ``--out DIR`` (folder inputs keep their relative sub-folders, so equal names in different folders
do not clash; two files differing only by extension get ``<stem>_<ext>`` names): ``<name>_mask.png`` (0/255),
``<name>_overlay.png`` and ``summary.json`` (per image: file, score, mask/overlay paths relative to DIR,
answer, error). Unreadable images are reported on stderr, listed with their error and skipped; the exit
status is non-zero only when no image could be processed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = "detect_output"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="anomaly masks, overlays, scores and answers for an image or a folder",
        description="Run a VMAD model on an image or on every image under a folder (recursively). Writes "
        "<name>_mask.png (0/255), <name>_overlay.png and summary.json to --out. The default question is the "
        "paper's template with the object name (--class-name, else 'object'). --no-answer is the fast "
        "segmentation-only path (one forward per batch).",
    )
    parser.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images")
    parser.add_argument("--question", help="question to ask (default: the paper's template)")
    parser.add_argument("--class-name", metavar="NAME", help="object name for the default question")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true", help="print summary.json, not one line per image")
    parser.add_argument("--model", default="small", metavar="small|PATH",
                        help="'small' (packaged weights) or a checkpoint folder (save_trainable output)")
    parser.add_argument("--answer", action=argparse.BooleanOptionalAction, default=True,
                        help="generate a text answer (default) or segment only (--no-answer, fastest)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="mask = probability > T (default 0.5)")
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


def output_stems(root: Path, files: Sequence[Path]) -> list[Path]:
    """Relative output stem per file: ``sub/dir/name``; ``sub/dir/name_<ext>`` when two files in one folder
    differ only by extension."""
    stems = [p.relative_to(root).with_suffix("") for p in files]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [
        s.with_name(f"{s.name}_{p.suffix.lstrip('.').lower()}") if counts[s] > 1 else s
        for s, p in zip(stems, files, strict=True)
    ]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vmad.data import read_image
    from vmad.errors import DataError, VMADError
    from vmad.infer.detector import Detector, DetectorConfig, resolve_model_path
    from vmad.infer.render import overlay, save_png

    config = DetectorConfig(threshold=args.threshold, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, device=args.device).validate()
    if not 0.0 <= args.alpha <= 1.0:
        raise VMADError(f"--alpha must be in [0, 1], got {args.alpha}")
    weights = resolve_model_path(args.model)  # fail fast, before scanning and loading
    out_dir = Path(args.out)
    root, files = find_images(Path(args.input), out_dir)
    stems = output_stems(root, files)

    detector = Detector.from_pretrained(weights, config=config)
    detector.name = args.model
    question = args.question or detector.default_question(args.class_name, args.answer)
    keys = ("score", "mask", "overlay", "answer", "mask_description", "error", "mask_pixels", "mask_from",
            "height", "width")
    rows: list[dict[str, Any]] = [{"file": str(p), **dict.fromkeys(keys)} for p in files]
    bar = tqdm(total=len(files), unit="img", disable=True if args.no_progress or len(files) == 1 else None)

    def fail(i: int, message: str) -> None:
        rows[i]["error"] = message
        tqdm.write(f"skipped: {message}", file=sys.stderr)

    try:
        for start in range(0, len(files), config.batch_size):
            idx, images = [], []
            for i in range(start, min(start + config.batch_size, len(files))):
                try:
                    images.append(read_image(files[i]))
                    idx.append(i)
                except DataError as exc:
                    fail(i, str(exc))
            dets = detector.detect(images, args.question, answer=args.answer, class_name=args.class_name)
            for i, image, det in zip(idx, images, dets, strict=True):
                mask_rel = stems[i].with_name(stems[i].name + "_mask.png")
                over_rel = stems[i].with_name(stems[i].name + "_overlay.png")
                try:
                    save_png(out_dir / mask_rel, det.mask)
                    save_png(out_dir / over_rel, overlay(image, det.probability_map, det.mask, args.alpha))
                except OSError as exc:
                    fail(i, f"{files[i]}: cannot write outputs ({exc})")
                    continue
                rows[i].update(
                    score=round(det.anomaly_score, 6), mask=mask_rel.as_posix(), overlay=over_rel.as_posix(),
                    answer=det.answer, mask_description=det.mask_description,
                    mask_pixels=int(det.mask.sum()), mask_from=det.mask_from,
                    height=int(det.mask.shape[0]), width=int(det.mask.shape[1]),
                )
                if not args.json:
                    answer = f"  {det.answer!r}" if det.answer is not None else ""
                    tqdm.write(f"{files[i]}  score {det.anomaly_score:.4f}  "
                               f"mask {100.0 * det.mask.mean():.1f}%{answer}")
            bar.update(min(config.batch_size, len(files) - start))
    finally:
        bar.close()

    n_ok = sum(r["error"] is None for r in rows)
    summary = {
        "model": str(args.model),
        "weights": str(weights),
        "input": str(args.input),
        "question": question,
        "answer_mode": bool(args.answer),
        "threshold": config.threshold,
        "score_rule": detector.model.config.score.rule,
        "paths": "mask and overlay paths are relative to this file's folder",
        "n_images": len(rows),
        "n_processed": n_ok,
        "n_failed": len(rows) - n_ok,
        "images": rows,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print(f"wrote {n_ok} mask(s) and overlay(s) and summary.json to {out_dir}"
              + (f"; {len(rows) - n_ok} image(s) skipped" if n_ok < len(rows) else ""))
    if n_ok == 0:
        raise VMADError(f"no image could be processed ({len(rows)} failed; see {out_dir / 'summary.json'})")
    return 0
