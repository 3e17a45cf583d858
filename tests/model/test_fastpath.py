"""The GPU fast path (vmad.model.fastpath): on the CPU its parts are checked one by one (float32 and bf16
weights, merged LoRA, static cache, resize rules on the device against PIL); the tests marked ``cuda`` run
the whole path (bf16 + torch.compile of the decode step) and skip cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmad.errors import VMADError
from vmad.model.build import build_vmad
from vmad.model.fastpath import attention_implementations, enable_fast_path
from vmad.model.image_encoders import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, FrozenImageModule
from vmad.model.vmad import VMADModel
from vmad_testing import SEG_Q, TEXT_Q

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _outputs(model: VMADModel, images: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    seg = model.segment(images, SEG_Q)
    gen = model.generate(images, [SEG_Q, TEXT_Q], max_new_tokens=6)
    return seg.probs.float().cpu(), gen.token_ids


@pytest.mark.parametrize("resize", ["pad_square", "longest_side"])
@pytest.mark.parametrize("shape", [(2, 3, 300, 451), (1, 3, 500, 200), (1, 3, 100, 100)])
def test_resize_on_device_matches_pil_to_one_grey_level(resize: str, shape: tuple[int, ...]) -> None:
    mean, std = (CLIP_MEAN, CLIP_STD) if resize == "pad_square" else (SAM_MEAN, SAM_STD)
    module = FrozenImageModule(224, mean, std, resize)
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    pil = module.prepare(images)
    module.resize_on_device = True
    tensor = module.prepare(images)
    levels = ((pil - tensor) * module.std).abs() * 255
    assert tensor.shape == pil.shape
    assert float(levels.max()) <= 1.0 + 1e-3 and float(levels.mean()) < 0.05


def test_float32_fast_path_keeps_masks_and_answers() -> None:
    """Merged LoRA, static cache and on-device resizing change nothing beyond rounding."""
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    plain = build_vmad("tiny").eval()
    probs, tokens = _outputs(plain, images)
    fast = build_vmad("tiny").eval()
    report = enable_fast_path(fast, dtype=torch.float32, compile_decode=False)
    assert report["lora_merged"] and report["static_cache"] and not report["compiled_decode"]
    assert set(report["attention"].values()) == {"sdpa"} and "llm" in report["attention"]
    fast_probs, fast_tokens = _outputs(fast, images)
    torch.testing.assert_close(fast_probs, probs, atol=1e-3, rtol=0)
    assert fast_tokens == tokens


def test_bf16_fast_path_casts_the_frozen_parts_only() -> None:
    model = build_vmad("tiny").eval()
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    probs, _ = _outputs(model, images)
    enable_fast_path(model, compile_decode=False)
    assert next(model.vision_encoder.parameters()).dtype == torch.bfloat16
    assert next(model.base_lm().parameters()).dtype == torch.bfloat16
    assert next(model.mask_decoder.parameters()).dtype == torch.float32  # trained parts stay float32
    fast_probs, tokens = _outputs(model, images)
    assert torch.isfinite(fast_probs).all() and all(1 <= len(t) <= 6 for t in tokens)
    torch.testing.assert_close(fast_probs, probs, atol=2e-2, rtol=0)


def test_fast_path_is_for_inference_only() -> None:
    model = build_vmad("tiny").train()
    with pytest.raises(VMADError, match="eval"):
        enable_fast_path(model)


def test_attention_report_names_the_hf_parts(tiny: VMADModel) -> None:
    report = attention_implementations(tiny)
    assert report["llm"] == "sdpa" and report["mask_decoder.decoder"] == "sdpa"


# ------------------------------------------------------------------------------------------ CUDA only


@cuda
def test_cuda_compiled_decoding_matches_eager_static_decoding() -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = build_vmad("tiny").eval()
    ref_probs, _ = _outputs(reference, images)
    model = build_vmad("tiny", device="cuda").eval()
    report = enable_fast_path(model)
    assert report["compiled_decode"] and report["device"].startswith("cuda")
    probs, compiled = _outputs(model, images.cuda())
    again = model.generate(images.cuda(), [SEG_Q, TEXT_Q], max_new_tokens=6).token_ids  # graphs replayed
    model.decode_options.compile = False
    _, eager = _outputs(model, images.cuda())
    assert compiled == eager == again
    torch.testing.assert_close(probs, ref_probs, atol=2e-2, rtol=0)  # bf16 against float32 on the CPU


@cuda
def test_cuda_detector_small_batches_and_uses_the_fast_path(smol_cache: Path) -> None:
    from vmad.infer import Detector
    from vmad.infer.detector import DetectorConfig

    images = [torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    one = Detector.from_pretrained("small", device="cuda", config=DetectorConfig(batch_size=1))
    four = Detector.from_pretrained("small", device="cuda", config=DetectorConfig(batch_size=4))
    assert four.model.decode_options.compile and four.model.decode_options.static_cache
    a = one.detect(images, class_name="bottle")
    b = four.detect(images, class_name="bottle")
    for x, y in zip(a, b, strict=True):
        assert abs(x.probability_map - y.probability_map).max() <= 2e-2
    answers = four.detect(images[:2], class_name="bottle", answer=True, max_new_tokens=8)
    assert all(d.answer for d in answers)
