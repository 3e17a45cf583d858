"""`vmad detect` end to end with a tiny checkpoint: outputs, summary, bad images, name clashes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.model import weights_io
from vmad_testing import save_random_image


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 images: RGB 32x24, grayscale 20x30 in a sub-folder, and a truncated PNG."""
    root = tmp_path / "images"
    good = save_random_image(root / "rgb.png", (24, 32, 3), 1)
    save_random_image(root / "sub" / "grey.png", (30, 20), 2)
    (root / "broken.png").write_bytes(good.read_bytes()[:70])
    return root


def _detect(*argv: str) -> int:
    return main(["detect", *argv, "--max-new-tokens", "4", "--no-progress"])


def test_detect_folder_writes_outputs_and_skips_the_corrupt_image(tiny_ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _detect(str(image_folder), "--model", str(tiny_ckpt), "--out", str(out), "--class-name", "widget")
    assert rc == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_images"], summary["n_processed"], summary["n_failed"]) == (3, 2, 1)
    assert "widget" in summary["question"] and summary["answer_mode"] is True
    rows = {Path(r["file"]).name: r for r in summary["images"]}
    assert set(rows) == {"rgb.png", "grey.png", "broken.png"}
    bad = rows["broken.png"]
    assert "truncated" in bad["error"] and bad["mask"] is None and bad["score"] is None
    for name, size in (("rgb.png", (24, 32)), ("grey.png", (30, 20))):
        row = rows[name]
        assert row["error"] is None and isinstance(row["answer"], str) and 0 <= row["score"] <= 1
        mask = np.array(Image.open(out / row["mask"]))
        over = np.array(Image.open(out / row["overlay"]))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        assert over.shape == (*size, 3) and over.dtype == np.uint8
        assert row["mask_pixels"] == int((mask == 255).sum()) and (row["height"], row["width"]) == size
    assert rows["grey.png"]["mask"] == "sub/grey.png_mask.png"
    assert rows["rgb.png"]["overlay"] == "rgb.png_overlay.png"
    assert "wrote 2 mask(s)" in captured.out


def test_detect_json_and_no_answer(tiny_ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _detect(str(image_folder / "rgb.png"), "--model", str(tiny_ckpt), "--out", str(out), "--json",
                 "--no-answer", "--threshold", "0")
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    [row] = printed["images"]
    assert row["answer"] is None and row["mask_from"] == "segment" and row["mask"] == "rgb.png_mask.png"
    assert row["mask_pixels"] == 24 * 32  # threshold 0: every pixel of a sigmoid map
    assert row["mask_description"] == (
        "The mask marks one region at the center (about 32 x 24 px, 100.0 % of the image).")
    assert printed["question"].endswith("segmentation result.")


def test_nested_and_extension_clashes_keep_distinct_outputs(tiny_ckpt, tmp_path, capsys):
    root = tmp_path / "imgs"
    save_random_image(root / "a" / "x.png", (16, 16, 3), 1)
    save_random_image(root / "b" / "x.png", (16, 16, 3), 2)
    save_random_image(root / "b" / "x.jpg", (16, 16, 3), 3)
    out = root / "results"  # inside the input folder: never scanned as input
    for _ in range(2):
        assert _detect(str(root), "--model", str(tiny_ckpt), "--out", str(out), "--no-answer") == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_images"] == 3
    masks = sorted(r["mask"] for r in summary["images"])
    assert masks == ["a/x.png_mask.png", "b/x.jpg_mask.png", "b/x.png_mask.png"]
    assert all((out / m).is_file() for m in masks)


def test_no_processable_image_is_an_error(tiny_ckpt, tmp_path, capsys):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert _detect(str(root), "--model", str(tiny_ckpt), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no image could be processed")
    assert json.loads((out / "summary.json").read_text())["n_failed"] == 1


def test_model_small_without_packaged_weights_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights_io, "packaged_weights_dir", lambda name="small": tmp_path / "absent")
    assert _detect(str(image_folder), "--model", "small", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the packaged 'small' weights are not installed")
    assert not (tmp_path / "o").exists()


def test_missing_input_and_out_equal_to_input(tiny_ckpt, image_folder, tmp_path, capsys):
    assert _detect(str(tmp_path / "nothing"), "--model", str(tiny_ckpt)) == 2
    assert "no such image file or folder" in capsys.readouterr().err
    assert _detect(str(image_folder), "--model", str(tiny_ckpt), "--out", str(image_folder)) == 2
    assert "is the input folder" in capsys.readouterr().err


def test_decoding_workers_do_not_change_the_outputs(tiny_ckpt, image_folder, tmp_path, capsys):
    """--workers 2 (images decoded ahead in worker processes, batch of 2) writes what --workers 0 writes;
    the unreadable image is still skipped with its error."""
    summaries = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        rc = _detect(str(image_folder), "--model", str(tiny_ckpt), "--out", str(out), "--batch-size", "2",
                     "--workers", workers)
        assert rc == 0
        summaries.append(json.loads((out / "summary.json").read_text())["images"])
    assert summaries[0] == summaries[1]
    assert [r["error"] is None for r in summaries[0]] == [False, True, True]  # broken.png first (sorted)
    assert _detect(str(image_folder), "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"),
                   "--workers", "-1") == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
