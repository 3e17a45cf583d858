"""Saving and loading the trained parts (round trip, mismatches, format version 1, fine-tuning with a
new part) and exporting the LLM with LoRA merged, with the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vmad.cli import main
from vmad.errors import VMADError
from vmad.model.build import build_vmad, load_pretrained, preset_config
from vmad.model.weights_io import merge_lora
from vmad_testing import SEG_Q, loss_dict, mask_prompt_model, tiny_batch, tiny_config


def test_save_load_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    model = build_vmad("tiny")
    with torch.no_grad():  # move every trained part away from its initial value
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    images = torch.rand(2, 3, 64, 64, generator=g)
    batch = tiny_batch(model)
    with torch.no_grad():
        ref_seg = model.segment(images, SEG_Q)
        ref_loss = loss_dict(model, batch)
    folder = model.save_trainable(tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["config"]["preset"] == "tiny"
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "model.safetensors")))
    assert not any(k.startswith(("vision_encoder.", "visual_backbone.")) for k in keys)
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)
    assert {"new_token_rows.embed", "new_token_rows.out"} <= keys and any("lora_A" in k for k in keys)
    assert meta["version"] == 2

    loaded = load_pretrained(folder)
    with torch.no_grad():
        seg = loaded.segment(images, SEG_Q)
        loss = loss_dict(loaded, batch)
    assert torch.equal(seg.probs, ref_seg.probs)
    assert torch.equal(seg.scores, ref_seg.scores)
    for key in ("loss", "loss_txt", "loss_bce", "loss_dice"):
        assert torch.equal(loss[key], ref_loss[key])

    merged = merge_lora(loaded)
    with torch.no_grad():
        after = loaded.segment(images, SEG_Q)
    assert not hasattr(loaded.llm, "merge_and_unload") and merged is loaded.llm
    torch.testing.assert_close(after.probs, ref_seg.probs, atol=1e-4, rtol=0)


def test_load_rejects_mismatched_checkpoint(tmp_path: Path) -> None:
    model = build_vmad("tiny")
    folder = model.save_trainable(tmp_path / "a")
    other = build_vmad(tiny_config(kind="mlp"))
    with pytest.raises(VMADError, match="does not match"):
        other.load_trainable(folder)
    config = preset_config("tiny")
    config.lora.r = config.lora.r * 2  # same keys, other LoRA shapes: a clear error, not torch's
    with pytest.raises(VMADError, match="shapes differ.*lora"):
        build_vmad(config).load_trainable(folder)


def test_version_1_files_load_under_current_names(tmp_path: Path) -> None:
    """Files written before the model was split (format version 1: ``new_token_embed``/``new_token_out``,
    DSSL heads under ``aux_modules.``) load onto the current model with the same outputs."""
    from safetensors.torch import load_file, save_file

    trained = build_vmad("tiny")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = trained.save_trainable(tmp_path / "v2")
    renamed = {"new_token_rows.embed": "new_token_embed", "new_token_rows.out": "new_token_out"}
    state = {renamed.get(k, k): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    state["aux_modules.pbsd.dssl.meta_net.0.weight"] = torch.zeros(2, 2)
    old = tmp_path / "v1"
    old.mkdir()
    save_file(state, str(old / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    meta.update(version=1, aux_modules=["pbsd"])
    (old / "config.json").write_text(json.dumps(meta))
    loaded = load_pretrained(old)
    images = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.segment(images, SEG_Q).probs, trained.segment(images, SEG_Q).probs)
    assert torch.equal(loaded.new_token_rows.out, trained.new_token_rows.out)
    meta["version"] = 3
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(VMADError, match="newer vmad"):
        load_pretrained(old)


def test_export_merges_lora_into_a_standalone_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    model = build_vmad("tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.startswith("new_token")):
                p.add_(0.1)
    model.save_trainable(tmp_path / "ckpt")
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "llm", local_files_only=True)
    ids = torch.tensor([[5, 40, model.seg_token_id, 7]])
    with torch.no_grad():
        h = model.base_lm().model(inputs_embeds=model.embed_tokens(ids)).last_hidden_state
        torch.testing.assert_close(lm(input_ids=ids).logits, model.logits(h), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "vmad" / "model.safetensors").is_file()


def test_fine_tune_load_keeps_a_new_mask_prompt_fresh(tmp_path: Path) -> None:
    plain = build_vmad("tiny")
    plain.save_trainable(tmp_path / "plain")
    model = mask_prompt_model()
    n_prompt = sum(p.numel() for p in model.mask_prompt.parameters())
    assert model.summary()["components"]["mask_prompt"] == {"parameters": n_prompt, "trainable": n_prompt}
    assert "mask_prompt" not in plain.summary()["components"]
    with pytest.raises(VMADError, match="missing"):
        model.load_trainable(tmp_path / "plain")
    fresh = model.load_trainable(tmp_path / "plain", keep_fresh=("mask_prompt.",))
    assert sorted(fresh) == sorted(f"mask_prompt.{k}" for k in model.mask_prompt.state_dict())
    torch.testing.assert_close(model.seg_head.net[0].weight, plain.seg_head.net[0].weight)
    model.save_trainable(tmp_path / "with_prompt")
    again = load_pretrained(tmp_path / "with_prompt")
    assert again.mask_prompt is not None
    torch.testing.assert_close(again.mask_prompt.mlp[-1].weight, model.mask_prompt.mlp[-1].weight)


def test_fine_tune_load_leaves_out_a_part_the_model_is_built_without(tmp_path: Path) -> None:
    from vmad_testing import tiny_config

    cfg = tiny_config()
    cfg.mask_decoder.prior_prompt = True
    with_prior = build_vmad(cfg)
    with torch.no_grad():
        with_prior.seg_head.net[0].weight.add_(0.5)
    with_prior.save_trainable(tmp_path / "prior")
    plain = build_vmad(tiny_config())
    with pytest.raises(VMADError, match="unexpected"):
        plain.load_trainable(tmp_path / "prior")
    assert plain.load_trainable(tmp_path / "prior", leave_out=("mask_decoder.prior_prompt.",)) == []
    torch.testing.assert_close(plain.seg_head.net[0].weight, with_prior.seg_head.net[0].weight)
    assert not any(k.startswith("mask_decoder.prior_prompt.") for k in plain.state_dict())


def test_training_output_folder_resolves_to_final_or_lists_checkpoints(tmp_path: Path) -> None:
    from vmad.model.weights_io import CONFIG_NAME, WEIGHTS_NAME, resolve_model_path

    def weights(folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / CONFIG_NAME).write_text("{}")
        (folder / WEIGHTS_NAME).write_bytes(b"x")
        return folder

    run = tmp_path / "run"
    weights(run / "checkpoint-10" / "model")
    weights(run / "checkpoint-2" / "model")
    (run / "checkpoint-5").mkdir()  # no weights: not listed
    with pytest.raises(VMADError) as err:
        resolve_model_path(run)
    message = str(err.value)
    assert "without final/" in message and "--resume" in message
    assert message.index("checkpoint-2") < message.index("checkpoint-10") and "checkpoint-5" not in message
    assert resolve_model_path(run / "checkpoint-10" / "model") == run / "checkpoint-10" / "model"
    final = weights(run / "final")
    assert resolve_model_path(run) == final and resolve_model_path(str(run)) == final
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "log.jsonl").write_text("")
    with pytest.raises(VMADError, match="no weights yet"):
        resolve_model_path(empty_run)
    with pytest.raises(VMADError, match=r"not a VMAD checkpoint folder \(missing config.json, model"):
        resolve_model_path(tmp_path / "run" / "checkpoint-5")
