"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Files are written to a temporary file in the same folder (``.<name>.<pid>.<random>.tmp``, created with the
normal ``0666 & ~umask`` permissions) and moved into place with ``os.replace``; on any failure the temporary
file is removed and the destination is left untouched. With ``fsync`` (the default) the file's data is
flushed to disk before the rename and the folder entry after it, so a crash never leaves a truncated file
under the final name.

Folders (:func:`atomic_dir`) are built in ``<out>.tmp-XXXXXXXX`` beside ``<out>`` and renamed into place;
an existing ``<out>`` is first moved to ``<out>.tmp-XXXXXXXX.old`` and deleted after the new one is in place.
A run killed part-way (even by SIGKILL) is repaired at the next start by :func:`recover_dir`: when ``<out>``
is missing and an ``<out>.tmp-*.old`` folder exists, the old folder is RESTORED as ``<out>`` (the killed run
is undone, never half-completed); then every other folder matching the builder's own naming pattern
(``<out>.tmp-`` + 8 mkdtemp characters, optionally ``.old``) is deleted. Two builds into the same ``<out>``
at the same time are not supported (the second would delete the first one's temporary folder).
:func:`inside_dir` keeps every path written below the output folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmad.errors import DataError


def current_umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` would give)."""
    return 0o666 & ~current_umask()


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; skipped where a folder cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique hidden temporary name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it is ``os.replace``'d onto
    ``path`` (fsync'ed first, and the folder after, with ``fsync``), on failure it is removed. The parent
    folder must exist."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "xb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(
    path: str | Path,
    data: Any,
    indent: int | None = 2,
    allow_nan: bool = True,
    newline: bool = True,
    fsync: bool = True,
) -> None:
    """Write ``data`` as JSON (``json.dumps(data, indent=indent, allow_nan=allow_nan)``, plus a final newline
    with ``newline``) to ``path`` atomically (see :func:`atomic_path`)."""
    text = json.dumps(data, indent=indent, allow_nan=allow_nan) + ("\n" if newline else "")
    write_text_atomic(path, text, fsync=fsync)


# ------------------------------------------------------------------------------------------ folders


_MKDTEMP_CHARS = "[a-z0-9_]{8}"


def _temp_dir_pattern(out: Path) -> re.Pattern[str]:
    """Names of :func:`atomic_dir`'s temporary folders of ``out``: ``<name>.tmp-XXXXXXXX[.old]``."""
    return re.compile(rf"{re.escape(out.name)}\.tmp-{_MKDTEMP_CHARS}(\.old)?")


def recover_dir(out: str | Path) -> list[Path]:
    """Repair what a killed :func:`atomic_dir` left beside ``out``; return the folders deleted.

    If ``out`` is missing and an ``<out>.tmp-XXXXXXXX.old`` folder exists (killed between the two renames
    of :func:`replace_dir`), that old folder is renamed back to ``out``: the killed run is undone. Then the
    stale ``<out>.tmp-XXXXXXXX`` / ``.old`` folders (only names of exactly that pattern) are deleted."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = _temp_dir_pattern(out)
    stale = sorted(
        p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )
    if not out.exists() and not out.is_symlink():
        olds = [p for p in stale if p.name.endswith(".old")]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
            os.rename(newest, out)
            fsync_dir(parent)
            stale.remove(newest)
    for p in stale:
        shutil.rmtree(p)
    return stale


def inside_dir(out: str | Path, relative: str | os.PathLike[str], what: str | Path | None = None) -> Path:
    """``out / relative`` for a path about to be written; DataError (naming ``what``, default ``out``)
    unless it stays inside ``out``: absolute paths and ``..`` segments are refused, and the resolved path
    (symlinks included) must lie inside the resolved ``out``."""
    out = Path(out)
    text = os.fspath(relative)
    rel = Path(text)
    if not text or "\x00" in text or rel.is_absolute() or rel.drive or rel.root or ".." in rel.parts:
        raise DataError(what or out, f"output path {text!r} would leave the output folder {out}")
    target = out / rel
    try:
        inside = target.resolve().is_relative_to(out.resolve())
    except (OSError, RuntimeError) as exc:
        raise DataError(what or out, f"output path {text!r} cannot be resolved ({exc})") from None
    if not inside:
        raise DataError(what or out, f"output path {text!r} would leave the output folder {out}")
    return target


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh ``<out>.tmp-XXXXXXXX`` folder beside ``out``; on success it replaces ``out`` (atomic
    rename, see :func:`replace_dir`), on any failure it is removed and ``out`` is left untouched. The
    parent of ``out`` is created, and what a killed earlier run left is repaired first
    (:func:`recover_dir`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Give ``tmp`` the normal folder mode (``0777 & ~umask``, not mkdtemp's 0700) and rename it to ``out``;
    an existing ``out`` folder is moved aside first and deleted after."""
    os.chmod(tmp, 0o777 & ~current_umask())
    if out.is_dir():
        old = tmp.with_name(tmp.name + ".old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
