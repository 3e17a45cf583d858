"""Helpers shared by the test modules (importable: ``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    import pytest

    from vmad.model.config import VMADConfig
    from vmad.model.vmad import VMADModel

SEG_Q = (
    "Are there any abnormalities present in the bottle? If so, please output the defect segmentation result."
)
TEXT_Q = "Are there any abnormalities present in the bottle?"

# Tiny projector setting (tests/model/test_projectors.py, test_ltc.py): encoder width, the four earlier
# levels' widths, LLM width, and small LTC settings.
PROJ_C, PROJ_LEVEL_DIMS, PROJ_D = 32, [16, 16, 32, 32], 48
PROJ_TINY = {"heads": 4, "points": 2, "local_blocks": 1, "ffn_ratio": 1.0}


def loss_dict(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's forward plus the training loss (Eq. 6-7) as a flat dict: ``loss``, ``loss_txt``,
    ``loss_bce``/``loss_dice`` (0.0 without masks), ``mask_logits`` (None without masks)."""
    from vmad.train.losses import VMADLoss

    output = model(batch)
    terms = VMADLoss(model.config.loss)(model, batch, output)
    zero = torch.zeros(())
    return {
        "loss": terms.loss,
        "loss_txt": terms.txt,
        "loss_bce": terms.bce if terms.bce is not None else zero,
        "loss_dice": terms.dice if terms.dice is not None else zero,
        "mask_logits": output.mask_logits,
    }


def tiny_batch(model: Any) -> dict[str, torch.Tensor]:
    """A training batch of two 64x64 images for ``model``: a segmentation question answered with
    ``<seg>`` (box mask) and a text-only question."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    masks = torch.zeros(2, 64, 64)
    masks[0, 20:40, 10:30] = 1
    return model.prepare_batch(images, [SEG_Q, TEXT_Q], ["It is <seg>.", "No, the bottle is normal."], masks)


def tiny_config(**projector: object) -> VMADConfig:
    """The tiny preset's config with the projector settings ``projector`` overridden."""
    from vmad.model.build import preset_config
    from vmad.model.config import VMADConfig

    cfg = preset_config("tiny")
    return VMADConfig.from_dict({**cfg.to_dict(), "projector": {**cfg.projector.to_dict(), **projector}})


def mask_prompt_model(n_tokens: int = 2) -> VMADModel:
    """The tiny model (seed 0, eval mode) with ``n_tokens`` mask-prompt tokens whose output depends on
    the mask (the last layer, zero at initialisation, is drawn at random)."""
    from vmad.model.build import build_vmad, preset_config
    from vmad.model.config import VMADConfig

    cfg = preset_config("tiny").to_dict()
    cfg["llm"]["mask_prompt_tokens"] = n_tokens
    torch.manual_seed(0)
    model = build_vmad(VMADConfig.from_dict(cfg))
    assert model.mask_prompt is not None
    with torch.no_grad():  # the last layer starts at zero; make the prompt depend on the mask
        model.mask_prompt.mlp[-1].weight.normal_(std=0.5)
    return model.eval()


def force_logits(model: VMADModel, monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
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


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random ``h`` x ``w`` RGB uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def projector_inputs(grid: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random last-layer tokens [batch, grid², PROJ_C] and the four earlier levels [batch, grid², c]."""
    g = torch.Generator().manual_seed(seed)
    last = torch.randn(batch, grid * grid, PROJ_C, generator=g)
    levels = [torch.randn(batch, grid * grid, c, generator=g) for c in PROJ_LEVEL_DIMS]
    return last, levels


def tiny_projector(grid: int = 24, **kw: object) -> torch.nn.Module:
    """A projector (seed 0) of the tiny setting ``PROJ_TINY`` with the settings ``kw`` overridden."""
    from vmad.model.build import build_projector
    from vmad.model.projectors import ProjectorConfig

    torch.manual_seed(0)
    return build_projector(ProjectorConfig(**{**PROJ_TINY, **kw}), PROJ_C, PROJ_LEVEL_DIMS, PROJ_D, grid)


def tiny_hf_folders(root: Path, randomize_projector: bool = False) -> tuple[Path, Path, nn.Module]:
    """A tiny random LLaVA (CLIP + Llama + ``multi_modal_projector``) and SAM folder in Hugging Face format
    under ``root``, and the saved LLaVA's projector (``randomize_projector``: random biases too, which HF
    initialises to zero)."""
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
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=56,
        patch_size=14,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4,
    )  # fmt: skip
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=1023)
    )
    if randomize_projector:
        with torch.no_grad():
            for p in llava.model.multi_modal_projector.parameters():
                p.normal_(0.0, 0.2)
    llava.save_pretrained(root / "llava")
    from vmad.model.llm import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(root / "llava")
    sam = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
            output_channels=32, global_attn_indexes=[1], window_size=2, num_pos_feats=16,
        ).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=64, image_embedding_size=4, mask_input_channels=8
        ).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=4, iou_head_hidden_dim=32
        ).to_dict(),
    )  # fmt: skip
    SamModel(sam).save_pretrained(root / "sam")
    return root / "llava", root / "sam", llava.model.multi_modal_projector.eval()


def tiny_paper_config() -> Any:
    """The paper preset at the shapes of :func:`tiny_hf_folders` (float32)."""
    from vmad.model.build import preset_config

    cfg = preset_config("paper")
    cfg.llm.dtype = "float32"
    cfg.backbone.image_size = 64
    cfg.mask_decoder.dim = cfg.seg_head.out_dim = 32
    cfg.mask_decoder.heads = cfg.projector.heads = 4
    return cfg


RIAD_ANSWERS = {
    "description": "A bright square stain lies on the plate.",
    "impact": "It spoils the surface finish.",
    "suggestion": "Clean the plate and check the line.",
}


def write_riad(root: Path, classes: tuple[str, ...] = ("plate", "tile"), per_class: int = 6) -> Path:
    """A small RIAD-format dataset (docs/riad_format.md): half normal, half with a bright square defect."""
    rng = np.random.default_rng(0)
    manifest = {"format": "riad", "version": 1, "classes": {}}
    for name in classes:
        cdir = root / name
        (cdir / "images").mkdir(parents=True)
        manifest["classes"][name] = {"normal_description": f"A clean {name} with an even grey surface."}
        images, anns = [], []
        for i in range(per_class):
            arr = (rng.random((48, 56, 3)) * 60 + 90).astype(np.uint8)
            entry = {"id": i + 1, "file_name": f"images/{i:03d}.png", "width": 56, "height": 48}
            if i % 2:
                x, y = int(rng.integers(4, 36)), int(rng.integers(4, 28))
                arr[y : y + 14, x : x + 14] = 250
                poly = [x, y, x + 14, y, x + 14, y + 14, x, y + 14]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": 1,
                        "iscrowd": 0,
                        "segmentation": [poly],
                        "bbox": [x, y, 14, 14],
                        "area": 196,
                    }
                )
                entry.update(label="anomalous", defect_type="stain", answers=RIAD_ANSWERS)
            else:
                entry.update(label="normal", answers=None)
            Image.fromarray(arr).save(cdir / entry["file_name"])
            images.append(entry)
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "stain"}]}
        (cdir / "annotations_train.json").write_text(json.dumps(coco))
    (root / "classes.json").write_text(json.dumps(manifest))
    return root


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_overrides(data: Path, out: Path, steps: int, **extra: object) -> list[str]:
    """``--set`` overrides of a short tiny training run into ``out`` (checkpoints every 2 steps)."""
    sets = {
        "data.root": str(data),
        "output_dir": str(out),
        "train.max_steps": steps,
        "train.batch_size": 2,
        "train.save_every": 2,
        "train.log_every": 1,
        "train.keep_checkpoints": None,
        "train.progress": False,
        "dssl.num_boxes": 4,
        **extra,
    }
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def save_random_image(path: Path, shape: tuple[int, ...], seed: int = 0, **save_options: Any) -> Path:
    """A random uint8 image of ``shape`` ((H, W) or (H, W, C)) saved to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save_options)
    return path
