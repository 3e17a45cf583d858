"""What the web page (``vmad serve``) accepts: file types, file size, pixel count, files per batch, zips.

Every check raises :class:`vmad.errors.VMADError` with one line that names the uploaded file (its own name,
not the server's temporary path) and the problem; the page shows that line and keeps serving. Rules (OURS):

- Type: the name must end in an image extension vmad reads (:data:`vmad.data.io.IMAGE_EXTENSIONS`) and the
  file's header must be an image Pillow can open (a text file renamed ``.png`` is refused).
- Size: at most ``max_file_bytes`` per image file (default 20 MB); a zip of a batch at most
  ``max_zip_bytes`` (default 200 MB), each image in it at most ``max_file_bytes`` once extracted.
- Pixels: images of more than ``max_image_pixels`` (H * W, from the header, before decoding) are refused;
  images above the detector's ``max_pixels`` but below this limit are processed downscaled, as by
  ``vmad detect`` (:mod:`vmad.infer.detector`).
- Batch: at most ``max_batch_files`` images per batch, counting the images inside zips.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmad.atomic import write_bytes_atomic
from vmad.data.io import IMAGE_EXTENSIONS, image_shape
from vmad.errors import DataError, VMADError

MB = 1024 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """The page's limits (see the module rules)."""

    max_file_bytes: int = 20 * MB
    max_image_pixels: int = 64_000_000
    max_batch_files: int = 100
    max_zip_bytes: int = 200 * MB

    def validate(self) -> UploadLimits:
        for name in ("max_file_bytes", "max_image_pixels", "max_batch_files", "max_zip_bytes"):
            if getattr(self, name) < 1:
                raise VMADError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        """The largest single upload the server takes at all (an image or a zip)."""
        return max(self.max_file_bytes, self.max_zip_bytes)

    def describe(self) -> str:
        """The limits in one line, for the page."""
        return (
            f"images {', '.join(IMAGE_EXTENSIONS)} up to {format_bytes(self.max_file_bytes)} and "
            f"{self.max_image_pixels:,} pixels; batches up to {self.max_batch_files} images "
            f"(zip up to {format_bytes(self.max_zip_bytes)})"
        )


def format_bytes(n: int) -> str:
    """``20 MB``, ``1.5 MB``, ``900 KB``, ``12 bytes``."""
    if n >= MB:
        return f"{n / MB:.1f}".removesuffix(".0") + " MB"
    if n >= 1024:
        return f"{n / 1024:.1f}".removesuffix(".0") + " KB"
    return f"{n} bytes"


def check_image_file(path: str | Path, limits: UploadLimits, name: str | None = None) -> tuple[int, int]:
    """(H, W) of an uploaded image after the type, size and pixel checks (VMADError ``name: problem``
    otherwise); ``name`` is what the message calls the file (default: the file's own name)."""
    path = Path(path)
    name = name or path.name
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise VMADError(f"{name}: not an image type vmad reads (use {', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise VMADError(f"{name}: the upload is missing on the server; upload it again")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise VMADError(
            f"{name}: {format_bytes(size)} is over the {format_bytes(limits.max_file_bytes)} limit per image"
        )
    try:
        height, width = image_shape(path)
    except DataError as exc:
        raise VMADError(f"{name}: {exc.problem}") from None
    if height * width > limits.max_image_pixels:
        raise VMADError(
            f"{name}: {width} x {height} = {height * width:,} pixels is over the limit of "
            f"{limits.max_image_pixels:,} pixels"
        )
    return height, width


@dataclass
class BatchItem:
    """One file of a batch: ``name`` as the user knows it (``parts.zip/a.png`` for zip members), ``path`` on
    the server (None when refused) and ``error`` (None when accepted by the checks so far)."""

    name: str
    path: Path | None = None
    error: str | None = None


def expand_batch(paths: list[Path], limits: UploadLimits, work_dir: Path) -> list[BatchItem]:
    """The batch's items: images as uploaded, zips unpacked into ``work_dir`` (member names are never used
    as paths there). Each image is checked (:func:`check_image_file`); a refused one keeps its error and the
    others go on. VMADError when the batch is empty or holds more than ``max_batch_files`` images."""
    items: list[BatchItem] = []
    for path in paths:
        if path.suffix.lower() == ".zip":
            items.extend(_zip_items(path, limits, work_dir, first_index=len(items)))
        else:
            items.append(BatchItem(path.name, path))
    if not items:
        raise VMADError("the batch is empty: upload images or a .zip of images")
    if len(items) > limits.max_batch_files:
        raise VMADError(
            f"the batch holds {len(items)} files; the limit is {limits.max_batch_files} per batch"
        )
    for item in items:
        if item.path is not None and item.error is None:
            try:
                check_image_file(item.path, limits, item.name)
            except VMADError as exc:
                item.error = str(exc)
    return items


def _member_wanted(info: zipfile.ZipInfo) -> bool:
    """False for folders, hidden files and macOS resource forks inside a zip."""
    parts = PurePosixPath(info.filename).parts
    return not info.is_dir() and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _zip_items(path: Path, limits: UploadLimits, work_dir: Path, first_index: int) -> list[BatchItem]:
    """The image members of one uploaded zip, extracted as ``<n>_<file name>`` into ``work_dir``; members
    that are no image or too large are returned refused, unextracted."""
    if path.stat().st_size > limits.max_zip_bytes:
        raise VMADError(
            f"{path.name}: {format_bytes(path.stat().st_size)} is over the "
            f"{format_bytes(limits.max_zip_bytes)} limit per zip"
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VMADError(f"{path.name}: not a readable zip file ({exc})") from None
    items: list[BatchItem] = []
    with archive:
        members = [m for m in archive.infolist() if _member_wanted(m)]
        if len(members) > limits.max_batch_files:
            raise VMADError(
                f"{path.name}: holds {len(members)} files; the limit is {limits.max_batch_files} per batch"
            )
        for info in members:
            name = f"{path.name}/{info.filename}"
            base = PurePosixPath(info.filename).name
            if PurePosixPath(base).suffix.lower() not in IMAGE_EXTENSIONS:
                items.append(BatchItem(name, error=f"{name}: not an image type vmad reads"))
                continue
            target = work_dir / f"{first_index + len(items):04d}_{_safe_name(base)}"
            items.append(_extract(archive, info, target, name, limits.max_file_bytes))
    return items


def _extract(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str, limit: int
) -> BatchItem:
    """Copy one member to ``target``, reading at most ``limit + 1`` bytes whatever its header claims."""
    too_big = f"{name}: over the {format_bytes(limit)} limit per image"
    if info.file_size > limit:
        return BatchItem(name, error=too_big)
    try:
        with archive.open(info) as src:
            data = src.read(limit + 1)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        return BatchItem(name, error=f"{name}: cannot be extracted ({exc})")
    if len(data) > limit:
        return BatchItem(name, error=too_big)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, data, fsync=False)
    return BatchItem(name, target)


def _safe_name(name: str) -> str:
    """A file name of letters, digits, ``._-`` only (others become ``_``)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cleaned.lstrip(".") or "image"
