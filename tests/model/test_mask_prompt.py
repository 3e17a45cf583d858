"""The mask prompt: mask summary, neutral start, conditions only the text after <seg>, loss and
gradients; tiny preset."""

from __future__ import annotations

import pytest
import torch

from vmad_testing import SEG_Q, TEXT_Q, loss_dict, mask_prompt_model, tiny_batch


def test_mask_prompt_summary_and_neutral_start() -> None:
    from vmad.model.mask_prompt import MaskPrompt, mask_summary

    probs = torch.zeros(2, 32, 32)
    probs[1, 0:4, 28:32] = 0.9  # top right corner
    feats = mask_summary(probs, 4)
    assert tuple(feats.shape) == (2, 19)
    assert float(feats[0].abs().sum()) == 0.0
    assert feats[1, 3] == pytest.approx(0.9) and float(feats[1, :3].sum()) == 0.0  # pooled cell (0, 3)
    assert feats[1, 16] == pytest.approx(0.9) and feats[1, 18] == pytest.approx(16 / 1024)
    fresh = MaskPrompt(8, 3, grid=4, init_embedding=torch.arange(8.0))
    out = fresh(probs)
    assert tuple(out.shape) == (2, 3, 8)
    torch.testing.assert_close(out, torch.arange(8.0).expand(2, 3, 8))  # zero-initialised delta


def test_mask_prompt_conditions_only_the_text_after_seg() -> None:
    model = mask_prompt_model()
    images = torch.rand(2, 3, 64, 64)
    answer = "It is <seg>. A scratch."
    masks = model.segment(images, SEG_Q).probs
    after = model.answer_logprobs(images, SEG_Q, answer, after="It is <seg>.")
    with torch.no_grad():
        model.mask_prompt.base.normal_(std=1.0)
    assert torch.equal(model.segment(images, SEG_Q).probs, masks)  # <seg> state: before the prompt
    changed = model.answer_logprobs(images, SEG_Q, answer, after="It is <seg>.")
    assert not torch.allclose(changed, after, atol=1e-3)


def test_mask_prompt_training_loss_and_gradients() -> None:
    model = mask_prompt_model().train()
    batch = tiny_batch(model)
    out = loss_dict(model, batch)
    n = int((batch["labels"] != -100).sum())  # the prompt's positions carry no label
    model.eval()
    with torch.no_grad():
        answers = ["It is <seg>.", "No, the bottle is normal."]
        lp = model.answer_logprobs(batch["images"], [SEG_Q, TEXT_Q], answers)
        ev = loss_dict(model, batch)
    assert float(lp.sum()) == pytest.approx(-float(ev["loss_txt"]) * n, rel=1e-4)
    out["loss"].backward()
    grads = {name: p.grad for name, p in model.mask_prompt.named_parameters()}
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    assert out["mask_logits"].shape == (1, 64, 64)
