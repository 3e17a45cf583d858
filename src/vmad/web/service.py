"""What the web page does, without Gradio: analyse one upload, answer follow-ups, run a batch.

:class:`WebService` holds the one :class:`~vmad.infer.detector.Detector` of the server (loaded once) and a
work folder for the files the page offers for download. Every request writes into a folder of its own
(``<work_dir>/<time>-<random>``); folders older than ``max_age_s`` (default one hour) are removed when a new
request starts. Model calls are serialised by a lock (the page's queue runs one at a time anyway).

Uploads are checked first (:mod:`vmad.web.limits`); a refused upload is a VMADError whose one line the page
shows, and the service stays usable for the next request.
"""

from __future__ import annotations

import csv
import io
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vmad.atomic import write_json_atomic, write_text_atomic
from vmad.data.io import read_image_bounded
from vmad.errors import DataError, VMADError
from vmad.web.limits import BatchItem, UploadLimits, check_image_file, expand_batch
from vmad.web.outputs import preview_mask, preview_overlay, save_detection_images

if TYPE_CHECKING:
    from vmad.infer.detector import Detection, Detector

# Batch table columns (and the CSV header), in order.
BATCH_COLUMNS: tuple[str, ...] = (
    "file",
    "score",
    "verdict",
    "mask_percent",
    "mask_pixels",
    "mask_from",
    "answer",
    "mask_description",
    "downscaled",
    "error",
)
Progress = Callable[[int, int, str], None]


@dataclass
class Analysis:
    """One analysed upload: previews for the page, the files to download, and ``state`` (JSON-ready) that a
    follow-up question needs."""

    overlay: np.ndarray
    mask: np.ndarray
    score: float
    answer: str
    description: str
    note: str
    files: list[Path]
    state: dict[str, Any]
    verdict: str | None = None


@dataclass
class BatchResult:
    """A finished batch: one row per file (``BATCH_COLUMNS``), the gallery (overlay preview, caption) of the
    processed images and the CSV of the rows."""

    rows: list[dict[str, Any]]
    gallery: list[tuple[Path, str]]
    csv_path: Path
    n_failed: int = field(default=0)


class WebService:
    """The page's actions over one loaded detector (see the module docstring)."""

    def __init__(
        self,
        detector: Detector,
        limits: UploadLimits | None = None,
        work_dir: Path | None = None,
        alpha: float = 0.5,
        max_age_s: float = 3600.0,
    ) -> None:
        import tempfile

        self.detector = detector
        self.limits = (limits or UploadLimits()).validate()
        self.work_dir = (
            Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vmad-serve-"))
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.alpha = alpha
        self.max_age_s = max_age_s
        self._lock = threading.Lock()

    # ------------------------------------------------------------- one image
    def analyze(self, path: str | Path, class_name: str | None = None) -> Analysis:
        """Check the upload, detect with an answer, write mask / overlay / JSON; VMADError when refused."""
        path = Path(path)
        check_image_file(path, self.limits)
        pixels, size = _read(path, path.name, self.detector.config.max_pixels)
        class_name = (class_name or "").strip() or None
        with self._lock:
            [det] = self.detector.detect([pixels], answer=True, class_name=class_name, original_sizes=[size])
        folder = self._new_folder()
        stem = folder / path.name
        files = [
            stem.with_name(stem.name + "_mask.png"),
            stem.with_name(stem.name + "_overlay.png"),
            stem.with_name(stem.name + ".json"),
        ]
        preview = preview_overlay(pixels, det, self.alpha)
        save_detection_images(pixels, det, files[0], files[1], self.alpha, preview)
        answer = det.answer or ""
        record = {
            "file": path.name,
            "model": self.detector.name,
            "class_name": class_name,
            "threshold": self.detector.config.threshold,
            **_summary(det),
            "turns": [_turn(det.question, answer, det)],
        }
        write_json_atomic(files[2], record, allow_nan=False, fsync=False)
        state = {
            "image": str(path),
            "name": path.name,
            "class_name": class_name,
            "json": str(files[2]),
            "history": [[det.question, answer]],
            "record": record,
        }
        return Analysis(
            preview,
            preview_mask(det),
            float(det.anomaly_score),
            answer,
            det.mask_description,
            _note(det),
            files,
            state,
            det.verdict,
        )

    def follow_up(self, state: dict[str, Any] | None, question: str) -> tuple[str, dict[str, Any]]:
        """Answer ``question`` about the analysed image with the conversation so far; returns the reply and
        the updated state (the JSON download gains the turn)."""
        if not state:
            raise VMADError("upload an image (or pick an example) before asking a question")
        question = (question or "").strip()
        if not question:
            raise VMADError("type a question first")
        history = [(q, a) for q, a in state["history"]]
        with self._lock:
            turn = self.detector.chat(state["image"], history, question, class_name=state["class_name"])
        record = dict(state["record"])
        record["turns"] = [*record["turns"], _turn(question, turn.answer, turn.detection)]
        if Path(state["json"]).parent.is_dir():
            write_json_atomic(state["json"], record, allow_nan=False, fsync=False)
        new_state = {**state, "history": [list(t) for t in turn.history], "record": record}
        return turn.answer, new_state

    # ------------------------------------------------------------- batch
    def run_batch(
        self,
        paths: Sequence[str | Path],
        class_name: str | None = None,
        answer: bool = True,
        progress: Progress | None = None,
    ) -> BatchResult:
        """Detect every image of the upload (zips unpacked), one at a time, calling ``progress(done, total,
        name)`` before each and at the end; refused or unreadable files get a row with their error."""
        folder = self._new_folder()
        items = expand_batch([Path(p) for p in paths], self.limits, folder / "inputs")
        class_name = (class_name or "").strip() or None
        rows, gallery = [], []
        for index, item in enumerate(items):
            if progress is not None:
                progress(index, len(items), item.name)
            row, shown = self._batch_item(index, item, class_name, answer, folder)
            rows.append(row)
            if shown is not None:
                gallery.append((shown, f"{item.name}  score {row['score']:.3f}"))
        if progress is not None:
            progress(len(items), len(items), "done")
        csv_path = folder / "vmad_batch.csv"
        write_text_atomic(csv_path, rows_to_csv(rows), fsync=False)
        return BatchResult(rows, gallery, csv_path, sum(r["error"] is not None for r in rows))

    def _batch_item(
        self, index: int, item: BatchItem, class_name: str | None, answer: bool, folder: Path
    ) -> tuple[dict[str, Any], Path | None]:
        """The table row of one batch file and its overlay preview file (None when it failed)."""
        row: dict[str, Any] = {**dict.fromkeys(BATCH_COLUMNS), "file": item.name, "error": item.error}
        if item.error is not None or item.path is None:
            return row, None
        try:
            pixels, size = _read(item.path, item.name, self.detector.config.max_pixels)
            with self._lock:
                [det] = self.detector.detect(
                    [pixels], answer=answer, class_name=class_name, original_sizes=[size]
                )
        except VMADError as exc:
            row["error"] = str(exc)
            return row, None
        stem = folder / f"{index + 1:03d}_{item.path.name}"
        preview = preview_overlay(pixels, det, self.alpha)
        mask_path, overlay_path = (
            stem.with_name(stem.name + "_mask.png"),
            stem.with_name(stem.name + "_overlay.png"),
        )
        save_detection_images(pixels, det, mask_path, overlay_path, self.alpha, preview)
        shown = overlay_path
        if det.downscaled:  # the gallery shows the preview, not the full-size overlay
            from vmad.infer.render import save_png

            shown = save_png(stem.with_name(stem.name + "_preview.png"), preview)
        summary = _summary(det)
        row.update(
            score=summary["score"],
            verdict=det.verdict,
            mask_percent=round(100.0 * float(det.mask.mean()), 3),
            mask_pixels=summary["mask_pixels"],
            mask_from=det.mask_from,
            answer=det.answer,
            mask_description=det.mask_description,
            downscaled=det.downscaled,
        )
        return row, shown

    # ------------------------------------------------------------- files
    def _new_folder(self) -> Path:
        """A fresh request folder; request folders older than ``max_age_s`` are removed first."""
        now = time.time()
        for old in self.work_dir.iterdir():
            try:
                if old.is_dir() and now - old.stat().st_mtime > self.max_age_s:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue
        folder = self.work_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder


def _read(path: Path, name: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels decoded at most ``max_pixels`` (the detector's rule) and the file's (H, W); VMADError naming
    ``name`` when the file cannot be decoded."""
    try:
        return read_image_bounded(path, max_pixels)
    except DataError as exc:
        raise VMADError(f"{name}: {exc.problem}") from None


def _summary(det: Detection) -> dict[str, Any]:
    """Detection.summary() without the server-side file path, score rounded."""
    summary = {k: v for k, v in det.summary().items() if k != "source"}
    summary["score"] = round(float(det.anomaly_score), 6)
    return summary


def _turn(question: str, answer: str, det: Detection) -> dict[str, Any]:
    return {
        "question": question,
        "answer": answer,
        "score": round(float(det.anomaly_score), 6),
        "mask_from": det.mask_from,
        "mask_description": det.mask_description,
    }


def _note(det: Detection) -> str:
    """A line for the page when the image was processed downscaled, else empty."""
    if not det.downscaled:
        return ""
    (h, w), (height, width) = det.processed_size or (0, 0), det.size
    return (
        f"The image ({width} x {height}) is over the detector's pixel limit and was processed at "
        f"{w} x {h}; the mask and overlay files are at the image's size."
    )


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The batch rows as CSV text (``BATCH_COLUMNS``; empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=BATCH_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in BATCH_COLUMNS})
    return buffer.getvalue()
