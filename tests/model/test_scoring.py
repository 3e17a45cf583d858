"""Image score rules (max, smoothed max, mean of the top k) on hand-made maps."""

from __future__ import annotations

import pytest
import torch

from vmad.model.config import ScoreConfig
from vmad.model.scoring import image_scores


def test_image_score_rules() -> None:
    probs = torch.zeros(2, 32, 32)
    probs[0, 16, 16] = 1.0
    probs[1] = 0.3
    assert image_scores(probs, ScoreConfig(rule="max")).tolist() == pytest.approx([1.0, 0.3])
    smooth = image_scores(probs, ScoreConfig(rule="max_smoothed", sigma=2.0))
    assert 0 < float(smooth[0]) < 0.1 and float(smooth[1]) == pytest.approx(0.3, abs=1e-6)
    topk = image_scores(probs, ScoreConfig(rule="mean_topk", topk_ratio=2 / 1024))
    assert topk.tolist() == pytest.approx([0.5, 0.3])
