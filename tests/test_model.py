"""VMAD model core with the tiny preset (random weights, no download)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from vmad.cli import main
from vmad.errors import VMADError
from vmad.model.build import PRESETS, build_vmad, load_pretrained, preset_config
from vmad.model.chat_format import tokenize_dialogues
from vmad.model.config import ScoreConfig, VMADConfig
from vmad.model.llm import build_tiny_tokenizer
from vmad.model.scoring import image_scores
from vmad.model.vmad import VMADModel
from vmad.model.weights_io import merge_lora
from vmad.train.config import load_train_config, resolve_model_section
from vmad_testing import SEG_Q, TEXT_Q, loss_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> VMADModel:
    return build_vmad("tiny")


def _batch(model: VMADModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    masks = torch.zeros(2, 64, 64)
    masks[0, 20:40, 10:30] = 1
    return model.prepare_batch(images, [SEG_Q, TEXT_Q], ["It is <seg>.", "No, the bottle is normal."], masks)


def _tiny_config(**projector: object) -> VMADConfig:
    cfg = preset_config("tiny")
    return VMADConfig.from_dict({**cfg.to_dict(), "projector": {**cfg.projector.to_dict(), **projector}})


def test_gradients_reach_exactly_the_trainable_parameters(tiny: VMADModel) -> None:
    model = tiny
    model.zero_grad(set_to_none=True)
    model.train()
    out = loss_dict(model, _batch(model))
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
    batch = _batch(model)
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


def test_save_load_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    model = build_vmad("tiny")
    with torch.no_grad():  # move every trained part away from its initial value
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    images = torch.rand(2, 3, 64, 64, generator=g)
    batch = _batch(model)
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
    other = build_vmad(_tiny_config(kind="mlp"))
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


def _force_logits(model: VMADModel, monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
    """Make greedy decoding emit ``tokens`` (one per decoding step) whatever the weights."""
    original = model.logits
    step = {"n": 0}

    def forced(h: torch.Tensor) -> torch.Tensor:
        out = original(h)
        if h.dim() == 2:  # decoding step (training/segment paths call with other shapes)
            out = out.clone()
            out[..., tokens[min(step["n"], len(tokens) - 1)]] = 1e4
            step["n"] += 1
        return out

    monkeypatch.setattr(model, "logits", forced)


def test_generate_yields_mask_of_input_size_matching_fast_path(
    tiny: VMADModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny
    answer = model.chat_format.answer(model.config.llm.seg_answer, model.tokenizer.eos_token)
    tokens = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert model.seg_token_id in tokens
    _force_logits(model, monkeypatch, tokens)
    images = torch.rand(1, 3, 48, 80)
    gen = model.generate(images, SEG_Q, max_new_tokens=len(tokens) + 3)
    assert "<seg>" in gen.texts[0]
    assert gen.token_ids[0] == tokens
    assert gen.probs[0] is not None and tuple(gen.probs[0].shape) == (48, 80)
    monkeypatch.undo()
    fast = model.segment(images, SEG_Q)
    assert tuple(fast.probs.shape) == (1, 48, 80)
    # same <seg> rule in generation (KV cache) and in the teacher-forced fast path
    torch.testing.assert_close(gen.probs[0], fast.probs[0], atol=1e-4, rtol=0)
    assert gen.scores[0] == pytest.approx(float(fast.scores[0]), abs=1e-4)


def test_generate_without_seg_gives_no_mask(tiny: VMADModel, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = tiny.tokenizer.eos_token_id
    word = tiny.tokenizer.convert_tokens_to_ids("ĠYes")
    _force_logits(tiny, monkeypatch, [word, eos])
    gen = tiny.generate(torch.rand(2, 3, 64, 64), [TEXT_Q, "Is it normal?"], max_new_tokens=8)
    assert gen.texts == ["Yes", "Yes"] and gen.probs == [None, None] and gen.scores == [None, None]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_seg_position_follows_the_number_of_visual_tokens(padding_side: str) -> None:
    seen = {}
    for kind in ("mlp", "ltc"):
        model = build_vmad(_tiny_config(kind=kind))
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


def test_padded_vocabulary_never_shrinks() -> None:
    tok_len = len(build_tiny_tokenizer()) + 2  # + <seg>, <image>
    padded = build_vmad("tiny")
    assert padded.base_lm().get_input_embeddings().weight.shape[0] == 1024 > tok_len
    assert padded.seg_token_id == tok_len - 2 and padded.image_token_id == tok_len - 1
    cfg = preset_config("tiny")
    cfg.llm.vocab_rows = tok_len - 10
    grown = build_vmad(cfg)
    assert grown.base_lm().get_input_embeddings().weight.shape[0] == tok_len
    assert grown.base_lm().get_output_embeddings().weight.shape[0] == tok_len


def test_image_score_rules() -> None:
    probs = torch.zeros(2, 32, 32)
    probs[0, 16, 16] = 1.0
    probs[1] = 0.3
    assert image_scores(probs, ScoreConfig(rule="max")).tolist() == pytest.approx([1.0, 0.3])
    smooth = image_scores(probs, ScoreConfig(rule="max_smoothed", sigma=2.0))
    assert 0 < float(smooth[0]) < 0.1 and float(smooth[1]) == pytest.approx(0.3, abs=1e-6)
    topk = image_scores(probs, ScoreConfig(rule="mean_topk", topk_ratio=2 / 1024))
    assert topk.tolist() == pytest.approx([0.5, 0.3])


def test_tiny_tokenizer_is_deterministic_and_lossless() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "USER: Are there any abnormalities present in the Bottle? ü 3.5"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text and len(ids) < len(text)


@pytest.mark.parametrize("preset", PRESETS)
def test_config_files_match_presets(preset: str) -> None:
    data = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())
    assert data["model"] == {"preset": preset}  # the preset, no overrides
    assert VMADConfig.from_dict(resolve_model_section(data["model"])) == preset_config(preset)
    assert load_train_config(REPO / "configs" / f"{preset}.yaml").model == preset_config(preset)


def _summary(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["model", "summary", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_summary(info: dict) -> None:
    comps = info["components"]
    assert set(comps) >= {"vision_encoder", "projector", "llm", "seg_head", "visual_backbone", "mask_decoder"}
    for frozen in ("vision_encoder", "visual_backbone"):
        assert comps[frozen]["trainable"] == 0
    for trained in ("projector", "seg_head", "mask_decoder", "llm"):
        assert 0 < comps[trained]["trainable"] <= comps[trained]["parameters"]
    assert info["trainable_parameters"] == sum(c["trainable"] for c in comps.values())
    assert info["total_parameters"] == sum(c["parameters"] for c in comps.values() if "shared_with" not in c)


def test_summary_json_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    info = _summary(capsys, "--preset", "tiny")
    _check_summary(info)
    assert info["preset"] == "tiny" and info["visual_tokens"] == 16 and info["encoder_tokens"] == 64


def test_summary_json_paper_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    info = _summary(capsys, "--preset", "paper", "--random-weights")
    _check_summary(info)
    comps = info["components"]
    assert info["visual_tokens"] == 144 and info["encoder_tokens"] == 576
    assert 6.6e9 < comps["llm"]["parameters"] < 6.85e9
    assert comps["llm"]["trainable"] == 32 * 2 * (4096 * 8 * 2) + 2 * 2 * 4096  # LoRA q/v + 2 new rows in/out
    assert 0.29e9 < comps["vision_encoder"]["parameters"] < 0.31e9
    assert 0.62e9 < comps["visual_backbone"]["parameters"] < 0.65e9


def test_paper_preset_without_local_folders_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["model", "summary", "--preset", "paper", "--llava-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "LLaVA" in err and "\n" not in err
    with pytest.raises(VMADError, match="llava_path"):
        build_vmad("paper")


def _tiny_hf_folders(root: Path) -> tuple[Path, Path]:
    """A LLaVA- and a SAM-architecture folder in Hugging Face format, tiny and random."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    llava = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=1023)
    LlavaForConditionalGeneration(llava).save_pretrained(root / "llava")
    build_tiny_tokenizer().save_pretrained(root / "llava")
    sam = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            output_channels=32,
            global_attn_indexes=[1],
            window_size=2,
            num_pos_feats=16,
        ).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=64, image_embedding_size=4, mask_input_channels=8
        ).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=4, iou_head_hidden_dim=32
        ).to_dict(),
    )
    SamModel(sam).save_pretrained(root / "sam")
    return root / "llava", root / "sam"


def test_paper_preset_loads_local_llava_and_sam_folders(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration, SamModel

    llava_dir, sam_dir = _tiny_hf_folders(tmp_path)
    cfg = preset_config("paper")
    cfg.llm.dtype = "float32"
    cfg.backbone.image_size = 64
    cfg.mask_decoder.dim = cfg.seg_head.out_dim = 32
    cfg.mask_decoder.heads = cfg.projector.heads = 4
    model = build_vmad(cfg, llava_path=str(llava_dir), sam_path=str(sam_dir))
    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True)
    sam = SamModel.from_pretrained(sam_dir, local_files_only=True)
    assert torch.equal(model.base_lm().lm_head.weight[:1024], ref.lm_head.weight)
    clip, tower = model.vision_encoder.clip.state_dict(), ref.model.vision_tower.state_dict()
    assert clip.keys() == tower.keys() and all(torch.equal(clip[k], tower[k]) for k in clip)
    assert torch.equal(model.mask_decoder.decoder.mask_tokens.weight, sam.mask_decoder.mask_tokens.weight)
    info = model.summary()
    assert info["visual_tokens"] == 4 and info["components"]["visual_backbone"]["trainable"] == 0
    out = model.segment(torch.rand(1, 3, 40, 50), SEG_Q)
    assert tuple(out.probs.shape) == (1, 40, 50)


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


def test_lora_build_does_not_print_the_peft_deprecation_warning() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_vmad("tiny")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_answer_logprobs_equal_the_text_loss_and_skip_the_given_start(tiny: VMADModel) -> None:
    was_training = tiny.training
    tiny.eval()
    try:
        images = torch.rand(2, 3, 64, 64)
        answers = ["No, the bottle is normal.", "Yes, there is a scratch on it."]
        got = tiny.answer_logprobs(images, TEXT_Q, answers)
        for i, answer in enumerate(answers):  # sum of log p over the answer = -(mean CE) x (answer tokens)
            batch = tiny.prepare_batch(images[i : i + 1], [TEXT_Q], [answer])
            with torch.no_grad():
                loss = loss_dict(tiny, batch)["loss_txt"]
            n = int((batch["labels"] != -100).sum())
            assert float(got[i]) == pytest.approx(-float(loss) * n, rel=1e-4)
        seg = ["It is <seg>. No defect.", "It is <seg>. A scratch."]
        full = tiny.answer_logprobs(images, SEG_Q, seg)
        rest = tiny.answer_logprobs(images, SEG_Q, seg, after="It is <seg>.")
        assert bool((rest > full).all())  # the start's own tokens (log p < 0) are no longer counted
        one = tiny.answer_logprobs(images[1:], SEG_Q, seg[1], after="It is <seg>.")
        assert float(one[0]) == pytest.approx(float(rest[1]), rel=1e-4)
        with pytest.raises(VMADError, match="does not start with"):
            tiny.answer_logprobs(images, SEG_Q, "No defect.", after="It is <seg>.")
    finally:
        tiny.train(was_training)


def _mask_prompt_model(n_tokens: int = 2) -> VMADModel:
    cfg = preset_config("tiny").to_dict()
    cfg["llm"]["mask_prompt_tokens"] = n_tokens
    torch.manual_seed(0)
    model = build_vmad(VMADConfig.from_dict(cfg))
    assert model.mask_prompt is not None
    with torch.no_grad():  # the last layer starts at zero; make the prompt depend on the mask
        model.mask_prompt.mlp[-1].weight.normal_(std=0.5)
    return model.eval()


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


def test_mask_prompt_generation_matches_teacher_forcing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding with the KV cache (mask prompt fed after <seg>, other samples' slots masked) gives the same
    per-token log-probs as the two-pass teacher-forced path, for a left-padded batch of two questions."""
    model = _mask_prompt_model()
    answer = "It is <seg>. A scratch."
    eos = model.tokenizer.eos_token
    tokens = model.tokenizer(model.chat_format.answer(answer, eos), add_special_tokens=False)
    tokens = tokens["input_ids"]
    images = torch.rand(2, 3, 64, 64)
    questions = [SEG_Q, "Any defect?"]
    original = model.logits
    seen: list[torch.Tensor] = []
    step = {"n": 0}

    def forced(h: torch.Tensor) -> torch.Tensor:
        out = original(h)
        if h.dim() == 2:
            tok = tokens[min(step["n"], len(tokens) - 1)]
            seen.append(out.float().log_softmax(-1)[:, tok])
            out = out.clone()
            out[..., tok] = 1e4
            step["n"] += 1
        return out

    monkeypatch.setattr(model, "logits", forced)
    gen = model.generate(images, questions, max_new_tokens=len(tokens) + 2)
    monkeypatch.undo()
    assert gen.token_ids == [tokens, tokens] and all(p is not None for p in gen.probs)
    decoded = torch.stack(seen[: len(tokens)]).sum(0)
    teacher = model.answer_logprobs(images, questions, answer)
    torch.testing.assert_close(decoded, teacher, atol=1e-3, rtol=1e-4)
    fast = model.segment(images, questions)  # the prompt comes after <seg>: same masks as the fast path
    torch.testing.assert_close(torch.stack(gen.probs), fast.probs, atol=1e-4, rtol=0)


def test_mask_prompt_conditions_only_the_text_after_seg() -> None:
    model = _mask_prompt_model()
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
    model = _mask_prompt_model().train()
    batch = _batch(model)
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


def test_fine_tune_load_keeps_a_new_mask_prompt_fresh(tmp_path: Path) -> None:
    plain = build_vmad("tiny")
    plain.save_trainable(tmp_path / "plain")
    model = _mask_prompt_model()
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


def test_stage2_config_describes_the_packaged_small_weights() -> None:
    """configs/vmad_small_stage2.yaml is the recipe of the shipped weights: same model (the saved config
    holds the legacy ``loss.extra: {}``, which ``VMADConfig.from_dict`` drops), so fine-tuning from ``small``
    with it loads every tensor."""
    recipe = yaml.safe_load((REPO / "configs" / "vmad_small_stage2.yaml").read_text())
    shipped = json.loads((REPO / "src" / "vmad" / "weights" / "small" / "config.json").read_text())["config"]
    resolved = VMADConfig.from_dict(resolve_model_section(recipe["model"]))
    assert resolved.to_dict() == VMADConfig.from_dict(shipped).to_dict()
    assert shipped["llm"]["mask_prompt_tokens"] > 0
