"""VMAD model core with the tiny preset (random weights, no download)."""

from __future__ import annotations

import math

import pytest
import torch

from vmad.model.build import build_vmad, preset_config
from vmad.model.chat_format import tokenize_dialogues
from vmad.model.vmad import VMADModel
from vmad_testing import SEG_Q, TEXT_Q, loss_dict, tiny_batch, tiny_config


def test_gradients_reach_exactly_the_trainable_parameters(tiny: VMADModel) -> None:
    model = tiny
    model.zero_grad(set_to_none=True)
    model.train()
    out = loss_dict(model, tiny_batch(model))
    out["loss"].backward()
    model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    frozen_prefixes = ("vision_encoder.", "visual_backbone.")
    assert not any(n.startswith(frozen_prefixes) for n in trainable)
    llm_trainable = {n for n in trainable if n.startswith("llm.")}
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    # embedding matrices frozen; only the added rows (separate parameters) learn
    base = model.base_lm()
    assert not base.get_input_embeddings().weight.requires_grad
    assert not base.get_output_embeddings().weight.requires_grad
    seg_row = model.new_token_rows.token_ids.index(model.seg_token_id)
    assert model.new_token_rows.embed.grad[seg_row].abs().sum() > 0
    assert model.new_token_rows.out.grad[seg_row].abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("seg_head."))
    model.zero_grad(set_to_none=True)


def test_overfitting_one_batch_lowers_every_loss() -> None:
    model = build_vmad("tiny")
    batch = tiny_batch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    with torch.no_grad():
        first = {k: float(v) for k, v in loss_dict(model, batch).items() if k.startswith("loss")}
    for _ in range(60):
        opt.zero_grad()
        loss_dict(model, batch)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = {k: float(v) for k, v in loss_dict(model, batch).items() if k.startswith("loss")}
    for key in ("loss_txt", "loss_bce", "loss_dice", "loss"):
        assert last[key] < first[key], (key, first[key], last[key])
    assert last["loss_bce"] < 0.5 * first["loss_bce"] and last["loss_dice"] < 0.5 * first["loss_dice"]
    expected = last["loss_txt"] + 2.0 * last["loss_bce"] + 0.5 * last["loss_dice"]
    assert math.isclose(last["loss"], expected, rel_tol=1e-5)


def test_text_only_batch_has_zero_mask_loss(tiny: VMADModel) -> None:
    batch = tiny.prepare_batch(torch.rand(1, 3, 64, 64), [TEXT_Q], ["No."])
    with torch.no_grad():
        output = tiny(batch)
        out = loss_dict(tiny, batch)
    assert output.mask_logits is None and len(output.mask_rows) == 0
    assert float(out["loss_bce"]) == 0.0 and float(out["loss_dice"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["loss_txt"]))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_seg_position_follows_the_number_of_visual_tokens(padding_side: str) -> None:
    seen = {}
    for kind in ("mlp", "ltc"):
        model = build_vmad(tiny_config(kind=kind))
        m = model.projector.num_output_tokens(model.vision_encoder.grid)
        enc = tokenize_dialogues(
            model.tokenizer, model.chat_format, [SEG_Q, "Short?"], ["It is <seg>.", "Yes <seg>"], padding_side
        )
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            encoded = model.encode_images(images)
            assert encoded.visual_tokens.shape[1] == m
            seq = model.splice_images(enc["input_ids"], enc["attention_mask"], encoded)
        xids, xattn = seq.ids, seq.attention
        pos = model.seg_positions(xids)
        for b in range(2):
            raw = enc["input_ids"][b].tolist()
            expected = raw.index(model.seg_token_id) + m - 1  # the <image> id became m tokens
            assert int(pos[b]) == expected
            assert int(xids[b, expected]) == model.seg_token_id and int(xattn[b, expected]) == 1
        seen[kind] = m
    assert seen == {"mlp": 64, "ltc": 16}


def test_before_seg_rule_uses_the_predicting_state() -> None:
    cfg = preset_config("tiny")
    cfg.llm.seg_state = "before_seg"
    model = build_vmad(cfg)
    enc = tokenize_dialogues(model.tokenizer, model.chat_format, [SEG_Q, TEXT_Q], ["It is <seg>.", "No."])
    with torch.no_grad():
        encoded = model.encode_images(torch.rand(2, 3, 64, 64))
        xids = model.splice_images(enc["input_ids"], enc["attention_mask"], encoded).ids
    pos = model.seg_positions(xids)
    assert int(xids[0, pos[0] + 1]) == model.seg_token_id and int(pos[1]) == -1
