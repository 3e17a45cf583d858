"""vmad.atomic: files and folders appear complete or not at all, with the usual permissions."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest

from vmad.atomic import (
    atomic_dir,
    atomic_path,
    default_file_mode,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_write_files_replace_and_leave_no_temporary(tmp_path: Path, umask_027) -> None:
    path = tmp_path / "f.txt"
    write_text_atomic(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode() and _mode(path) == 0o640 == default_file_mode()
    write_bytes_atomic(path, b"\x00\x01", fsync=False)
    assert path.read_bytes() == b"\x00\x01"
    write_json_atomic(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    write_json_atomic(path, {"a": 1}, indent=1, newline=False)
    assert path.read_text() == '{\n "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": math.nan}, allow_nan=False)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_path_temporary_is_beside_the_target(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.bin.") and not path.exists()
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x" and not tmp.exists()


def test_atomic_dir_replaces_or_leaves_untouched(tmp_path: Path, umask_027) -> None:
    out = tmp_path / "sub" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith("out.tmp-") and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and _mode(out) == 0o750
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]
