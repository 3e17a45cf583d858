"""OURS: ``vmad model add-refiner`` and the mask refiner's use in ``vmad detect`` / ``vmad eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmad.infer.detector import Detector, DetectorConfig, VMADScorer


def _normals(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((64, 64, 3)) * 60 + 150).astype(np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def refined(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vmad.cli import main

    tmp = tmp_path_factory.mktemp("refiner")
    out = tmp / "with_refiner"
    plates = tmp / "plates"  # real defects, MPDD layout: a blank mask = normal
    _normals(plates / "train" / "images", 3)
    (plates / "train" / "masks").mkdir(parents=True)
    for i in range(3):
        mask = np.zeros((64, 64), np.uint8)
        mask[10:20 + i, 5:30] = 255 if i < 2 else 0
        Image.fromarray(mask).save(plates / "train" / "masks" / f"{i}.png")
    args = ["model", "add-refiner", "--model", str(tiny_ckpt), "--data", str(_normals(tmp / "normals")),
            "--samples", "4", "--steps", "3", "--defects", str(plates), "--real-samples", "2",
            "--out", str(out)]
    assert main(args) == 0
    return out


def test_add_refiner_writes_the_model_with_a_trained_refiner(refined: Path, tiny_ckpt: Path) -> None:
    base = Detector.from_pretrained(tiny_ckpt, config=DetectorConfig(device="cpu"))
    model = Detector.from_pretrained(refined, config=DetectorConfig(device="cpu")).model
    assert model.config.mask_decoder.refiner and model.mask_refiner is not None
    assert float(model.mask_refiner.head.weight.detach().abs().sum()) > 0  # trained (it starts at zero)
    assert (refined / "refiner-training" / "refiner-checkpoint.safetensors").is_file()
    assert (refined / "refiner-training" / "real-000.safetensors").is_file()  # --defects: real samples
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    [plain] = base.detect(image)
    [off] = Detector(model, DetectorConfig(device="cpu", refine=False)).detect(image)
    [on] = Detector(model, DetectorConfig(device="cpu")).detect(image)
    np.testing.assert_allclose(off.probability_map, plain.probability_map, atol=1e-6)  # decoder unchanged
    np.testing.assert_array_equal(on.probability_map, off.probability_map)  # the map is the decoder's
    np.testing.assert_array_equal(off.mask, plain.mask)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    logits = torch.logit(torch.from_numpy(on.probability_map).clamp(1e-7, 1 - 1e-7))[None]
    np.testing.assert_array_equal(on.mask, (model.refined_mask_logits(tensor, logits)[0] > 0).numpy())


def test_detect_records_and_switches_the_refiner(refined: Path, tiny_ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vmad.cli import main

    folder = _normals(tmp_path / "images", 2)
    summaries = {}
    for name, extra in (("on", []), ("off", ["--no-refine"])):
        out = tmp_path / name
        assert main(["detect", str(folder), "--model", str(refined), "--out", str(out), "--no-answer",
                     "--no-progress", *extra]) == 0
        summaries[name] = json.loads((out / "summary.json").read_text())
    assert (summaries["on"]["refine"], summaries["off"]["refine"]) == (True, False)
    scores = [[r["score"] for r in s["images"]] for s in summaries.values()]
    assert scores[0] == scores[1]  # the refiner changes masks only
    capsys.readouterr()
    assert main(["detect", str(folder), "--model", str(tiny_ckpt), "--out", str(tmp_path / "x"),
                 "--no-answer", "--no-refine"]) != 0
    assert "has no mask refiner" in capsys.readouterr().err


def test_eval_scorer_records_the_refiner(refined: Path, tiny_ckpt: Path) -> None:
    assert VMADScorer(refined).settings()["refine"] is True
    assert VMADScorer(refined, DetectorConfig(refine=False)).settings()["refine"] is False
    assert "refine" not in VMADScorer(tiny_ckpt).settings()


def test_real_samples_need_defects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmad.cli import main

    args = ["model", "add-refiner", "--data", str(_normals(tmp_path / "normals", 1)), "--real-samples", "5",
            "--out", str(tmp_path / "out")]
    assert main(args) != 0
    assert "--real-samples needs --defects" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
