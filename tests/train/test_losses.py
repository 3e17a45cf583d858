"""Eq. 6-7 (+ λ_pbsd L_pbsd) computed from the model's output by `VMADLoss`, with the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vmad.model.build import build_vmad
from vmad.train.losses import TrainingModule, VMADLoss, text_loss
from vmad_testing import TEXT_Q, tiny_batch


class ConstantPBSD(nn.Module):
    """Stands in for DSSLLoss: records what it was given, returns 3.0."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, model: nn.Module, batch: dict, output: object) -> torch.Tensor:
        self.seen.append(output.encoded.visual_tokens.shape[1])  # type: ignore[attr-defined]
        return torch.tensor(3.0)


def test_total_is_the_weighted_sum_of_the_terms() -> None:
    model = build_vmad("tiny")
    batch = tiny_batch(model)
    weights = dataclasses.replace(model.config.loss, txt=0.5, seg=2.0, bce=3.0, dice=0.25, pbsd=0.125)
    pbsd = ConstantPBSD()
    with torch.no_grad():
        output = model(batch)
        terms = VMADLoss(weights, pbsd)(model, batch, output)
    assert output.mask_logits is not None and output.mask_logits.shape == (1, 64, 64)
    assert output.mask_rows.tolist() == [0]
    assert pbsd.seen == [16]  # the LTC's 4x4 tokens reached the DSSL term
    expected = 0.5 * terms.txt + 2.0 * (3.0 * terms.bce + 0.25 * terms.dice) + 0.125 * 3.0
    assert float(terms.loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms.txt) == pytest.approx(float(text_loss(output)))
    assert terms.dice_masks == 1 and float(terms.pbsd) == 3.0


def test_without_masks_or_dssl_only_the_text_term_counts() -> None:
    model = build_vmad("tiny")
    batch = model.prepare_batch(torch.rand(1, 3, 64, 64), [TEXT_Q], ["No."])
    module = TrainingModule(model, VMADLoss(model.config.loss))
    terms = module(batch)
    assert terms.bce is None and terms.dice is None and terms.pbsd is None
    assert float(terms.loss.detach()) == pytest.approx(float(terms.txt.detach()))
    terms.loss.backward()  # Γ stays in the graph (DDP needs a gradient for every trained parameter)
    assert all(p.grad is not None for p in model.seg_head.parameters())
