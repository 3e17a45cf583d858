"""The <seg> verdict gate (OURS): the product rule, a fresh head, the mask's dependence on H̄_seg, the loss and
its gradients, saving; tiny preset."""

from __future__ import annotations

import pytest
import torch

from vmad_testing import SEG_Q, tiny_batch


def verdict_model(draw: bool = True):  # noqa: ANN201
    from vmad.model.build import build_vmad, preset_config
    from vmad.model.config import VMADConfig

    cfg = preset_config("tiny").to_dict()
    cfg["seg_head"]["verdict"] = True
    torch.manual_seed(0)
    model = build_vmad(VMADConfig.from_dict(cfg))
    if draw:  # a fresh head is zero; give it a direction so the verdict depends on H̄_seg
        with torch.no_grad():
            model.seg_verdict.linear.weight.normal_(std=1.0)
    return model.eval()


def test_gate_is_the_product_of_probabilities() -> None:
    from vmad.model.seg_verdict import gate_logits

    logits = torch.tensor([[[-3.0, 0.0], [2.0, 8.0]], [[-3.0, 0.0], [2.0, 8.0]]])
    verdict = torch.tensor([1.5, -20.0])
    gated = gate_logits(logits, verdict)
    expected = torch.sigmoid(logits) * torch.sigmoid(verdict)[:, None, None]
    torch.testing.assert_close(gated.sigmoid(), expected, rtol=1e-5, atol=1e-7)
    assert float(gated[1].sigmoid().max()) < 1e-8  # a normal verdict empties the mask
    assert torch.isfinite(gate_logits(torch.full((1, 1, 1), 60.0), torch.tensor([60.0]))).all()
    # per image the order of the pixels is kept
    assert torch.equal(gated[0].flatten().argsort(), logits[0].flatten().argsort())


def test_fresh_head_halves_the_mask_and_paper_model_has_none() -> None:
    from vmad.model.build import build_vmad, preset_config

    plain = build_vmad(preset_config("tiny")).eval()
    assert plain.seg_verdict is None and plain.verdict_logits(torch.zeros(1, 8)) is None
    fresh = verdict_model(draw=False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gated = fresh.segment(images, SEG_Q).probs
        fresh.seg_verdict = None
        ungated = fresh.segment(images, SEG_Q).probs
    torch.testing.assert_close(gated, ungated * 0.5, rtol=1e-4, atol=1e-6)


def test_masks_depend_on_the_seg_state() -> None:
    model = verdict_model()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    captured: list[torch.Tensor] = []
    original = type(model).mask_logits

    def swap(encoded, h_seg, size):  # noqa: ANN001, ANN202
        captured.append(h_seg)
        return original(model, encoded, h_seg.flip(0), size)  # each image gets the other's <seg> state

    with torch.no_grad():
        own = model.segment(images, SEG_Q)
        model.mask_logits = swap
        swapped = model.segment(images, SEG_Q)
    with torch.no_grad():
        v = model.verdict_logits(captured[0])
    assert abs(float(v[0] - v[1])) > 0.1
    ratio = swapped.probs / own.probs.clamp_min(1e-12)
    expected = torch.sigmoid(v.flip(0)) / torch.sigmoid(v)
    torch.testing.assert_close(ratio.flatten(1).median(1).values, expected, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(swapped.scores, own.scores)


def test_verdict_loss_trains_the_head_and_is_logged() -> None:
    from vmad.train.losses import VMADLoss, verdict_loss

    targets = torch.zeros(2, 4, 4)
    targets[0, 1, 1] = 1
    loss = verdict_loss(torch.tensor([2.0, -2.0]), targets)
    assert float(loss) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-2.0))))
    model = verdict_model().train()
    batch = tiny_batch(model)
    out = model(batch)
    assert out.verdict_logits is not None and out.verdict_logits.shape == (1,)
    terms = VMADLoss(model.config.loss)(model, batch, out)
    assert terms.verdict is not None
    expected = verdict_loss(out.verdict_logits.detach(), out.mask_targets)
    assert float(terms.verdict.detach()) == pytest.approx(float(expected))
    terms.loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.seg_verdict.parameters())
    no_verdict = VMADLoss(model.config.loss.__class__(verdict=0.0))(model, batch, model(batch))
    assert float(terms.loss - no_verdict.loss) == pytest.approx(float(terms.verdict), rel=1e-4)


def test_verdict_head_is_saved_and_loaded(tmp_path) -> None:  # noqa: ANN001
    model = verdict_model()
    model.save_trainable(tmp_path / "w")
    other = verdict_model(draw=False)
    other.load_trainable(tmp_path / "w")
    torch.testing.assert_close(other.seg_verdict.linear.weight, model.seg_verdict.linear.weight)
    assert "seg_verdict" in model.summary()["components"]
