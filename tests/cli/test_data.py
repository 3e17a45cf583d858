"""`vmad data inspect`: table, exact JSON shape, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmad.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["data", "inspect", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_json_exact_shape(capsys, tiny_mvtec: Path) -> None:
    rc, out, err = _run(capsys, str(tiny_mvtec / "widget"), "--json")
    assert rc == 0 and err == ""
    assert json.loads(out) == {
        "format": "mvtec",
        "classes": {
            "widget": {"normal": 5, "anomalous": 3, "masks": 3, "defect_types": {"dent": 1, "scratch": 2}}
        },
    }
    rc, out, _ = _run(capsys, str(tiny_mvtec), "--json", "--split", "train", "--format", "mvtec")
    assert rc == 0 and json.loads(out)["classes"]["widget"] == {
        "normal": 3,
        "anomalous": 0,
        "masks": 0,
        "defect_types": {},
    }


def test_inspect_table(capsys, tiny_mvtec: Path) -> None:
    rc, out, _ = _run(capsys, str(tiny_mvtec), "--verify")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("format: mvtec") and lines[1].split()[:4] == [
        "class",
        "normal",
        "anomalous",
        "masks",
    ]
    assert lines[2].split() == ["widget", "5", "3", "3", "dent", "1,", "scratch", "2"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break(kind: str, root: Path, fx) -> tuple[list[str], str]:
    """Damage the tiny MVTec dataset; return extra CLI flags and the file name the error must name."""
    cls = root / "widget"
    if kind == "unreadable":
        (cls / "test" / "good" / "000.png").write_bytes(b"\x89PNG garbage")
        return [], "000.png"
    if kind == "truncated_png":
        fx.write_image(cls / "test" / "good" / "big.png", size=(128, 128))
        _truncate(cls / "test" / "good" / "big.png")
        return ["--verify"], "big.png"
    if kind == "truncated_jpeg":
        fx.write_image(cls / "test" / "good" / "big.jpg", size=(128, 128))
        _truncate(cls / "test" / "good" / "big.jpg")
        return ["--verify"], "big.jpg"
    if kind == "size_mismatch":
        fx.write_mask(cls / "ground_truth" / "scratch" / "000_mask.png", size=(16, 16))
        return [], "000_mask.png"
    if kind == "missing_mask":
        (cls / "ground_truth" / "scratch" / "001_mask.png").unlink()
        return [], "001.png"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["unreadable", "truncated_png", "truncated_jpeg", "size_mismatch", "missing_mask"]
)
def test_bad_files_give_one_error_line(capsys, tiny_mvtec: Path, data_factory, kind: str) -> None:
    flags, name = _break(kind, tiny_mvtec, data_factory)
    rc, out, err = _run(capsys, str(tiny_mvtec), *flags)
    assert rc != 0 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and name in err, err
    if kind == "size_mismatch":
        assert "000.png" in err  # names the image too


def test_bad_folders_give_one_error_line(capsys, tmp_path: Path, data_factory) -> None:
    (tmp_path / "empty").mkdir()
    data_factory.write_image(tmp_path / "loose" / "a.png")
    for path, problem in (("empty", "empty folder"), ("loose", "unrecognised"), ("absent", "no such file")):
        rc, out, err = _run(capsys, str(tmp_path / path))
        assert rc != 0 and out == "" and len(err.splitlines()) == 1
        assert err.startswith(f"error: {tmp_path / path}: ") and problem in err


def test_console_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "vmad", "data", "inspect", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {tmp_path / 'empty'}: empty folder"


def test_folder_mask_name_option(capsys, tmp_path: Path, data_factory) -> None:
    root = tmp_path / "parts"
    data_factory.write_image(root / "images" / "a.png")
    data_factory.write_image(root / "images" / "b.png")
    data_factory.write_mask(root / "masks" / "a_label.png")
    rc, out, _ = _run(capsys, str(root), "--json", "--mask-name", "{stem}_label.png")
    assert rc == 0 and json.loads(out) == {
        "format": "folder",
        "classes": {"parts": {"normal": 1, "anomalous": 1, "masks": 1, "defect_types": {"defect": 1}}},
    }
    rc, _, err = _run(capsys, str(root), "--mask-name", "{bad}.png")
    assert rc != 0 and len(err.splitlines()) == 1 and "mask_name" in err


def test_mask_name_is_accepted_by_build_riad_and_eval(capsys, tmp_path: Path, data_factory) -> None:
    root = tmp_path / "caps"
    for name in ("x", "y", "z"):
        data_factory.write_image(root / "images" / f"{name}.png")
    data_factory.write_mask(root / "masks" / "x_mask.png")
    out = tmp_path / "riad"
    rc = main(["data", "build-riad", "--from", str(root), "--out", str(out), "--synthetic-per-normal", "0",
               "--quiet", "--mask-name", "{stem}_mask.png"])
    assert rc == 0
    capsys.readouterr()
    rc, printed, _ = _run(capsys, str(out), "--json")
    counts = json.loads(printed)["classes"]["caps"]
    assert (counts["normal"], counts["anomalous"]) == (2, 1)  # the x_mask.png mask was used
    rc = main(["eval", "--baseline", "musc", "--data", str(root), "--data-opt", "folder.bogus=1"])
    assert rc == 2 and "unknown data options.folder keys" in capsys.readouterr().err
