"""The calibration rule by hand, the threshold file (round trip, bad files, method checks) and the VMAD
detector's calibrate / verdict / threshold-file path with the random tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from vmad.errors import VMADError
from vmad.infer.calibration import Calibration, make_calibration, threshold_from_normals
from vmad.infer.detection import verdict_of
from vmad.infer.detector import Detector, DetectorConfig
from vmad_testing import random_rgb


def test_rule_by_hand():
    scores = [0.2, 0.4, 0.3, 0.5, 0.6]
    t, info = threshold_from_normals(scores, fpr=0.05)
    m, sd = np.mean(scores), np.std(scores, ddof=1)
    expected = m + stats.t.ppf(0.95, 4) * sd * math.sqrt(1.2)
    assert t == pytest.approx(expected) and info["t_quantile"] == pytest.approx(2.1318, abs=1e-4)
    assert (info["n"], info["max"]) == (5, 0.6)
    # a looser fpr lowers it, but never below the highest normal score
    assert threshold_from_normals(scores, fpr=0.3)[0] < t
    assert threshold_from_normals([0.5, 0.5, 0.5])[0] == 0.5
    for bad, match in (([0.3], "at least 2"), ([0.1, float("nan")], "NaN")):
        with pytest.raises(VMADError, match=match):
            threshold_from_normals(bad)
    with pytest.raises(VMADError, match="fpr"):
        threshold_from_normals(scores, fpr=0.0)


def test_logit_rule_by_hand_keeps_probability_thresholds_below_one():
    scores = [0.4649, 0.983, 0.9, 0.7, 0.95]  # a wide spread: the linear bound lies above 1
    assert threshold_from_normals(scores)[0] > 1.0
    t, info = threshold_from_normals(scores, scale="logit")
    z = np.log(np.array(scores) / (1 - np.array(scores)))
    bound = z.mean() + stats.t.ppf(0.95, 4) * z.std(ddof=1) * math.sqrt(1.2)
    assert t == pytest.approx(1 / (1 + math.exp(-bound))) and max(scores) < t < 1.0
    assert info["mean"] == pytest.approx(z.mean()) and info["max_probability"] == 0.983
    # saturated scores stay finite, and a threshold is never below the highest normal score
    assert threshold_from_normals([1.0, 1.0, 1.0], scale="logit")[0] == 1.0
    assert threshold_from_normals([0.0, 1.0], scale="logit")[0] == 1.0
    with pytest.raises(VMADError, match="probabilities in"):
        threshold_from_normals([0.5, 1.5], scale="logit")
    cal = make_calibration(scores, {"kind": "vmad"}, scale="logit")
    assert cal.scale == "logit" and cal.image_threshold == cal.mask_threshold == t


def test_exact_log_odds_replace_the_clamped_logit_of_saturated_scores():
    z = [28.0, 30.0, 33.0, 29.0, 31.0]  # probabilities within 1e-12 of 1: the clamp makes them all equal
    probs = [1 / (1 + math.exp(-v)) for v in z]
    clamped, _ = threshold_from_normals(probs, scale="logit")
    exact, info = threshold_from_normals(probs, scale="logit", log_odds=z)
    bound = np.mean(z) + stats.t.ppf(0.95, 4) * np.std(z, ddof=1) * math.sqrt(1.2)
    assert exact == pytest.approx(1 / (1 + math.exp(-bound)), abs=1e-16)
    assert info["mean"] == pytest.approx(30.2)
    assert max(probs) == clamped < exact < 1.0  # the clamped rule falls back to the highest normal score
    with pytest.raises(VMADError, match="2 log-odds for 5"):
        threshold_from_normals(probs, scale="logit", log_odds=z[:2])
    cal = make_calibration(probs, {"kind": "vmad"}, scale="logit", log_odds=z)
    assert cal.image_threshold == exact and cal.scores == probs


def test_detector_calibrate_uses_the_exact_log_odds_of_a_logit_space_model(tiny_ckpt):
    det = Detector.from_pretrained(tiny_ckpt, config=DetectorConfig(batch_size=2))
    det.model.config.score.space = "logit"
    normals = [random_rgb(24, 32, i) for i in range(3)]
    z = [d.score_logit for d in det.detect(normals, answer=False)]
    assert None not in z
    cal = det.calibrate(normals, apply=False)
    assert cal.stats["mean"] == pytest.approx(float(np.mean(z)), abs=1e-6)


def test_verdict_rule():
    assert verdict_of(0.5, None) is None
    assert verdict_of(0.5, 0.5) == "normal" and verdict_of(0.51, 0.5) == "anomalous"


def test_file_round_trip_and_bad_files(tmp_path):
    cal = make_calibration([0.9, 1.2, 1.0], {"kind": "vmad", "weights_sha256": "ab"}, mask_range=(0.0, 1.0))
    assert cal.image_threshold > 1.0 and cal.mask_threshold == 1.0  # clipped for probability maps
    path = cal.save(tmp_path / "sub" / "t.json")
    data = json.loads(path.read_text())
    assert data["format"] == "vmad-calibration" and data["scores"] == [0.9, 1.2, 1.0]
    assert Calibration.load(path) == cal
    with pytest.raises(VMADError, match="no such threshold file"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VMADError, match="bad.json: not a readable JSON"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(VMADError, match="not a vmad-calibration file"):
        Calibration.load(tmp_path / "other.json")
    (tmp_path / "nan.json").write_text(json.dumps({**data, "image_threshold": "high"}))
    with pytest.raises(VMADError, match="image_threshold must be a finite number"):
        Calibration.load(tmp_path / "nan.json")
    with pytest.raises(VMADError, match="is a folder"):
        cal.save(tmp_path)


def test_method_checks():
    cal = make_calibration([0.1, 0.2], {"kind": "vmad", "model": "a", "weights_sha256": "aa"})
    cal.check_method({"kind": "vmad", "model": "b", "weights_sha256": "aa"})  # same weights, other name
    cal.check_method({"kind": "vmad", "model": "b", "weights_sha256": None})  # unknown: not checked
    with pytest.raises(VMADError, match="another weights sha256"):
        cal.check_method({"kind": "vmad", "weights_sha256": "bb"})
    with pytest.raises(VMADError, match="calibrated for VMAD model 'a', not for baseline 'musc'"):
        cal.check_method({"kind": "musc"})


def test_detector_calibrate_gives_verdicts_and_the_file_restores_them(tiny_ckpt, tmp_path):
    det = Detector.from_pretrained(tiny_ckpt, config=DetectorConfig(batch_size=2))
    normals = [random_rgb(24, 32, i) for i in range(4)]
    [before] = det.detect(normals[0])
    assert before.verdict is None and before.image_threshold is None
    cal = det.calibrate(normals, class_name="widget")
    assert cal.method["kind"] == "vmad" and len(cal.method["weights_sha256"]) == 64
    assert cal.image_threshold >= max(cal.scores) and det.config.image_threshold == cal.image_threshold
    assert cal.scale == "logit" and cal.image_threshold <= 1.0  # probabilities: the bound on log-odds
    assert cal.image_threshold == threshold_from_normals(cal.scores, scale="logit")[0]
    assert det.config.threshold == cal.image_threshold
    dets = det.detect(normals)
    assert [d.verdict for d in dets] == ["normal"] * 4  # never above their own threshold
    assert all(d.image_threshold == cal.image_threshold for d in dets)
    assert dets[0].summary()["verdict"] == "normal"
    path = cal.save(tmp_path / "t.json")
    fresh = Detector.from_pretrained(tiny_ckpt, threshold_file=path)
    assert fresh.config.image_threshold == cal.image_threshold and fresh.calibration == cal
    # a detector with an image threshold below every score calls everything anomalous
    fresh.config = DetectorConfig(image_threshold=-1.0)
    assert {d.verdict for d in fresh.detect(normals)} == {"anomalous"}
    other = Detector(det.model)  # built in memory: no weights file to compare, kind still checked
    other.load_threshold_file(path)
    bad = make_calibration([0.1, 0.2], {"kind": "musc", "settings": {}})
    with pytest.raises(VMADError, match="calibrated for baseline 'musc'"):
        other.apply_calibration(bad)
