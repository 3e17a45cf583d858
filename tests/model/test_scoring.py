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


def test_prior_weight_shifts_the_score_logit_by_the_prior_peak() -> None:
    import math

    from vmad.model.scoring import PRIOR_NEUTRAL

    probs = torch.full((3, 8, 8), 0.2)
    priors = torch.zeros(3, 1, 4, 4)
    priors[0, 0, 1, 1] = PRIOR_NEUTRAL + 4.0  # strong evidence
    priors[1] = float("nan")                  # no prior: the mask's score
    priors[2, 0, 0, 0] = 50.0                 # clipped to the prior prompt's upper bound (12)
    cfg = ScoreConfig(rule="max", prior_weight=0.5)
    got = image_scores(probs, cfg, priors).tolist()
    logit = math.log(0.2 / 0.8)
    assert got[0] == pytest.approx(1 / (1 + math.exp(-(logit + 2.0))), rel=1e-6)
    assert got[1] == pytest.approx(0.2, rel=1e-6)
    assert got[2] == pytest.approx(1 / (1 + math.exp(-(logit + 0.5 * (12.0 - PRIOR_NEUTRAL)))), rel=1e-6)
    # weight 0: priors are ignored
    assert image_scores(probs, ScoreConfig(rule="max"), priors).tolist() == pytest.approx([0.2] * 3)
    # float64: scores near 1 keep their order
    near = torch.full((2, 4, 4), 0.999)
    peaks = torch.tensor([18.0, 21.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    a, b = image_scores(near, ScoreConfig(rule="max", prior_weight=2.0), peaks - 10.0).tolist()
    assert a < b < 1.0
    with pytest.raises(Exception, match="prior_weight"):
        ScoreConfig(prior_weight=-1.0).validate()


def test_logit_space_ranks_what_saturated_probabilities_tie() -> None:
    from vmad.model.scoring import score_logits

    logits = torch.full((3, 8, 8), -5.0)
    logits[0, 2, 2], logits[1, 2, 2], logits[2, 2, 2] = 30.0, 45.0, 1.0
    probs = logits.sigmoid()
    assert float(probs[0].max()) == float(probs[1].max()) == 1.0  # float32 saturates: a tie
    cfg = ScoreConfig(rule="max", space="logit")
    z = score_logits(probs, cfg, None, logits)
    assert z.dtype == torch.float64 and z.tolist() == pytest.approx([30.0, 45.0, 1.0])
    assert image_scores(probs, cfg, None, logits).tolist() == pytest.approx(torch.sigmoid(z).tolist())
    # the prior shift is added to the log-odds; an image without a prior keeps the mask's
    priors = torch.zeros(3, 1, 4, 4)
    priors[0, 0, 0, 0] = 7.0
    priors[2] = float("nan")
    shifted = score_logits(probs, ScoreConfig(rule="max", space="logit", prior_weight=2.0), priors, logits)
    assert shifted.tolist() == pytest.approx([30.0 + 2.0 * 4.0, 45.0 - 2.0 * 3.0, 1.0])
    # the smoothed rule blurs the logits, not the probabilities
    blurred = score_logits(probs, ScoreConfig(rule="max_smoothed", sigma=1.0, space="logit"), None, logits)
    assert -5.0 < float(blurred[1]) < 45.0 and float(blurred[1]) > float(blurred[0])
    # probability space: the log-odds of the usual score
    plain = ScoreConfig(rule="max")
    assert score_logits(probs, plain, None, logits).tolist()[2] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(Exception, match="space"):
        ScoreConfig(space="odds").validate()  # type: ignore[arg-type]
