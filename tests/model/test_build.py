"""Building VMAD: vocabulary rows, presets and config files, the model summary, the paper preset from
local Hugging Face folders, the LoRA build, and the stage-2 recipe of the packaged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vmad.cli import main
from vmad.errors import VMADError
from vmad.model.build import PRESETS, build_vmad, preset_config
from vmad.model.config import VMADConfig
from vmad.model.llm import build_tiny_tokenizer
from vmad.train.config import load_train_config, resolve_model_section
from vmad_testing import SEG_Q, tiny_hf_folders, tiny_paper_config

REPO = Path(__file__).resolve().parents[2]


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


def test_paper_preset_loads_local_llava_and_sam_folders(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration, SamModel

    llava_dir, sam_dir, _ = tiny_hf_folders(tmp_path)
    model = build_vmad(tiny_paper_config(), llava_path=str(llava_dir), sam_path=str(sam_dir))
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


def test_lora_build_does_not_print_the_peft_deprecation_warning() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_vmad("tiny")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_stage2_config_describes_the_packaged_small_weights() -> None:
    """configs/vmad_small_stage2.yaml is the recipe of the shipped weights: the same model plus the
    normality prior that ``vmad model add-prior`` gives it (fine-tuning from ``small`` with the recipe loads
    every other tensor and leaves the prior prompt out)."""
    recipe = yaml.safe_load((REPO / "configs" / "vmad_small_stage2.yaml").read_text())
    shipped = json.loads((REPO / "src" / "vmad" / "weights" / "small" / "config.json").read_text())["config"]
    resolved = VMADConfig.from_dict(resolve_model_section(recipe["model"])).to_dict()
    # trained by the recipe, then given the normality prior by `vmad model add-prior` (its defaults)
    resolved["mask_decoder"].update(prior_prompt=True, prior_skip=True, prior_skip_init=8.0,
                                    prior_skip_offset=2.0)
    resolved["score"].update(prior_weight=0.0, space="logit")
    assert resolved == VMADConfig.from_dict(shipped).to_dict()
    assert shipped["llm"]["mask_prompt_tokens"] > 0
