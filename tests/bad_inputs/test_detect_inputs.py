"""Issue 15, `vmad detect` and the Detector API: bad input never escapes, never crashes, never loses work.

Output names that cannot collide (extension kept, case-insensitive clashes suffixed), a bad ``--out`` found
before the model loads, ``--device cuda`` without CUDA as one error line, the question recorded as asked (an
empty one refused), and NaN / out-of-range / wide-integer pixel arrays checked by ``Detector.detect``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmad.cli import detect as detect_cli
from vmad.cli import main
from vmad.errors import ConfigError, VMADError
from vmad.infer.detector import Detector, DetectorConfig
from vmad_testing import save_random_image


def _detect(*argv: str) -> int:
    return main(["detect", *argv, "--max-new-tokens", "4", "--no-progress"])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `vmad detect` gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(detect_cli, "_load_detector", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ 1. output names

CLASHING_NAME_SETS = {
    "extension_vs_underscore": ["good.jpg", "good.png", "good_jpg.png"],
    "case_only": ["x.png", "x.PNG"],
    "case_only_folders": ["A/x.png", "a/x.png", "a/X.png"],
}


@pytest.mark.parametrize("names", list(CLASHING_NAME_SETS.values()), ids=list(CLASHING_NAME_SETS))
def test_output_names_never_collide_even_ignoring_case(tmp_path, names):
    files = [tmp_path / n for n in names]
    stems = detect_cli.output_stems(tmp_path, files)
    written = [p.as_posix().casefold() for s in stems for p in detect_cli.output_paths(s)]
    assert len(set(written)) == len(written) == 2 * len(names)
    for name, stem in zip(names, stems, strict=True):  # relative path and extension kept in the name
        assert stem.as_posix().startswith(name)


def test_output_naming_scheme_is_path_with_extension_then_case_suffix(tmp_path):
    names = ["good.jpg", "sub/good.jpg", "x.PNG", "x.png"]  # sorted order, as find_images gives them
    stems = detect_cli.output_stems(tmp_path, [tmp_path / n for n in names])
    assert [s.as_posix() for s in stems] == ["good.jpg", "sub/good.jpg", "x.PNG", "x.png~2"]
    assert [p.as_posix() for p in detect_cli.output_paths(stems[1])] == [
        "sub/good.jpg_mask.png",
        "sub/good.jpg_overlay.png",
    ]


@pytest.mark.parametrize(
    "stems",
    [["x.png", "X.PNG"], ["a.png", "a.png_mask.png/b.png"], ["summary.json/a.png"]],
    ids=["case_clash", "file_vs_folder", "folder_named_summary_json"],
)
def test_shared_output_files_are_refused_before_writing(stems):
    with pytest.raises(VMADError, match="would overwrite|is an output file"):
        detect_cli.check_distinct_outputs([Path(s) for s in stems])


@pytest.mark.parametrize("names", list(CLASHING_NAME_SETS.values()), ids=list(CLASHING_NAME_SETS))
def test_detect_folder_keeps_every_result_and_summary_describes_its_own_file(tiny_ckpt, tmp_path, names):
    root = tmp_path / "imgs"
    sizes = {}
    for i, name in enumerate(names):  # a different size per image: an overwritten mask shows up
        sizes[name] = (12 + 4 * i, 20 + 2 * i)
        save_random_image(root / name, (*sizes[name], 3), seed=i)
    out = tmp_path / "out"
    assert _detect(str(root), "--model", str(tiny_ckpt), "--out", str(out), "--no-answer") == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["images"]
    assert summary["n_processed"] == len(names)
    written = [r[k] for r in rows for k in ("mask", "overlay")]
    assert len({w.casefold() for w in written}) == len(written)
    for row in rows:
        name = Path(row["file"]).relative_to(root).as_posix()
        assert row["mask"].startswith(name) and row["overlay"].startswith(name)
        mask = np.array(Image.open(out / row["mask"]))
        overlay = np.array(Image.open(out / row["overlay"]))
        assert mask.shape == sizes[name] == (row["height"], row["width"]) == overlay.shape[:2]
        assert row["mask_pixels"] == int((mask == 255).sum())


# ------------------------------------------------------------------------------------------ 2. bad --out


def _make_out(kind: str, tmp_path: Path, monkeypatch) -> Path:
    if kind == "file":
        out = tmp_path / "out.txt"
        out.write_text("not a folder")
    elif kind == "under_a_file":
        (tmp_path / "f.txt").write_text("x")
        out = tmp_path / "f.txt" / "out"
    else:  # read-only folder (root ignores modes, so the probe is refused by hand there)
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
        if os.geteuid() == 0:

            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return out


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only"])
def test_bad_out_is_one_error_line_before_the_model_loads(
    tiny_ckpt, tmp_path, monkeypatch, capsys, no_model_load, kind
):
    save_random_image(tmp_path / "in" / "a.png", (16, 16, 3))
    out = _make_out(kind, tmp_path, monkeypatch)
    try:
        rc = _detect(str(tmp_path / "in"), "--model", str(tiny_ckpt), "--out", str(out))
    finally:
        if kind == "read_only":
            out.chmod(0o755)
    assert rc == 2
    assert _one_error_line(capsys).startswith(f"error: {out}: ")
    assert not any(out.glob(".vmad-write-probe-*")) if out.is_dir() else True


def test_writable_out_is_created_and_left_without_probe(tiny_ckpt, tmp_path):
    save_random_image(tmp_path / "in" / "a.png", (16, 16, 3))
    out = tmp_path / "new" / "deep" / "out"
    assert _detect(str(tmp_path / "in"), "--model", str(tiny_ckpt), "--out", str(out), "--no-answer") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png_mask.png", "a.png_overlay.png", "summary.json"]


# ------------------------------------------------------------------------------------------ 3. --device cuda


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_error_line(tiny_ckpt, tmp_path, monkeypatch, capsys, no_model_load, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_random_image(tmp_path / "in" / "a.png", (16, 16, 3))
    rc = _detect(
        str(tmp_path / "in"), "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--device", device
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"device {device!r}" in line and "CUDA" in line


def test_detector_config_refuses_missing_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        DetectorConfig(device="cuda").torch_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        DetectorConfig(device="cuda:3").torch_device()
    assert DetectorConfig(device="cpu").torch_device() == torch.device("cpu")


# ------------------------------------------------------------------------------------------ 4. question


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_one_error_line(tiny_ckpt, tmp_path, capsys, no_model_load, question):
    save_random_image(tmp_path / "in" / "a.png", (16, 16, 3))
    rc = _detect(
        str(tmp_path / "in"), "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--question", question
    )
    assert rc == 2
    assert "--question must not be empty" in _one_error_line(capsys)


@pytest.mark.parametrize("question", [None, "Is there a scratch on the widget?"])
def test_summary_records_the_question_asked(tiny_ckpt, tmp_path, monkeypatch, question):
    asked: list[str] = []
    real = Detector._segment

    def spy(self, images, q, *args, **kwargs):
        asked.append(q)
        return real(self, images, q, *args, **kwargs)

    monkeypatch.setattr(Detector, "_segment", spy)
    save_random_image(tmp_path / "in" / "a.png", (16, 16, 3))
    extra = [] if question is None else ["--question", question]
    out = tmp_path / "o"
    assert (
        _detect(str(tmp_path / "in"), "--model", str(tiny_ckpt), "--out", str(out), "--no-answer", *extra)
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert asked == [summary["question"]]
    if question is not None:
        assert summary["question"] == question


def test_detector_refuses_an_empty_question(tiny_model):
    det = Detector(tiny_model)
    with pytest.raises(VMADError, match="question must not be empty"):
        det.detect(np.zeros((8, 8, 3), np.uint8), question="")


# ------------------------------------------------------------------------------------------ 4. pixel values


def _pixels(kind: str):
    rng = np.random.default_rng(0)
    base = rng.random((16, 16, 3))
    if kind == "nan_array":
        arr = base.copy()
        arr[3, 4, 1] = np.nan
        return arr
    if kind == "inf_tensor":
        t = torch.from_numpy(base).permute(2, 0, 1).float()
        t[0, 0, 0] = float("inf")
        return t
    if kind == "float_0_255":
        return base * 255.0
    if kind == "negative_float":
        return base - 0.5
    if kind == "int64_above_255":
        return (base * 1000).astype(np.int64)
    if kind == "negative_int":
        return (base * 255).astype(np.int32) - 10
    if kind == "int_tensor_above_255":
        return (torch.from_numpy(base).permute(2, 0, 1) * 4000).to(torch.int64)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan_array", "NaN"),
        ("inf_tensor", "infinite"),
        ("float_0_255", r"values in \[0\.\d*, 25\d\.\d*\]; float images must be in \[0, 1\]"),
        ("negative_float", r"values in \[-0\.\d+, 0\.\d+\]"),
        ("int64_above_255", r"int64 has values in \[\d+, 9\d\d\]; integer images must be 0-255"),
        ("negative_int", "integer images must be 0-255"),
        ("int_tensor_above_255", "integer images must be 0-255"),
    ],
)
def test_detect_refuses_bad_pixel_values(tiny_model, kind, message):
    det = Detector(tiny_model)
    with pytest.raises(VMADError, match=message):
        det.detect(_pixels(kind))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_wide_integer_arrays_in_0_255_read_like_uint8(tiny_model, dtype):
    img = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    det = Detector(tiny_model)
    [ref] = det.detect(img)
    [wide] = det.detect(img.astype(dtype))
    assert wide.anomaly_score == pytest.approx(ref.anomaly_score, abs=1e-6)
    np.testing.assert_allclose(wide.probability_map, ref.probability_map, atol=1e-6)
