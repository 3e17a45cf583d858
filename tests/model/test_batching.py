"""Batched inference gives what one image at a time gives: masks (probabilities within 1e-3), image scores and
answer tokens, for questions of different lengths (right padding in ``segment``, left padding in
``generate``), ``<seg>`` emitted at a different step by each sample, the mask prompt fed at different steps,
and the static KV cache against the dynamic one; tiny preset (random weights) and the packaged small model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from vmad.model.outputs import GenerationResult
from vmad.model.vmad import VMADModel
from vmad_testing import SEG_Q, TEXT_Q, mask_prompt_model, random_rgb

QUESTIONS = [SEG_Q, "Is it normal?", TEXT_Q]  # three prompt lengths


def force_rows(
    model: VMADModel, monkeypatch: pytest.MonkeyPatch, schedules: Sequence[Sequence[int]]
) -> None:
    """Greedy decoding of batch row b emits ``schedules[b]`` first (one token per step), then decodes
    freely."""
    original = model.logits
    step = {"n": 0}

    def forced(h: torch.Tensor) -> torch.Tensor:
        out = original(h)
        if h.dim() == 2:  # a decoding step
            out = out.clone()
            for b, schedule in enumerate(schedules):
                if step["n"] < len(schedule):
                    out[b, schedule[step["n"]]] = 1e4
            step["n"] += 1
        return out

    monkeypatch.setattr(model, "logits", forced)


def generate_each(
    model: VMADModel,
    monkeypatch: pytest.MonkeyPatch,
    images: torch.Tensor,
    schedules: Sequence[Sequence[int]],
    tokens: int,
) -> tuple[GenerationResult, list[GenerationResult]]:
    """The batch decoded at once, then each sample alone, with the same per-sample forced starts."""
    force_rows(model, monkeypatch, schedules)
    batch = model.generate(images, QUESTIONS[: len(images)], max_new_tokens=tokens)
    monkeypatch.undo()
    singles = []
    for i in range(len(images)):
        force_rows(model, monkeypatch, [schedules[i]])
        singles.append(model.generate(images[i : i + 1], QUESTIONS[i], max_new_tokens=tokens))
        monkeypatch.undo()
    return batch, singles


def assert_same_answers(batch: GenerationResult, singles: list[GenerationResult]) -> None:
    for i, one in enumerate(singles):
        assert batch.token_ids[i] == one.token_ids[0], f"sample {i}"
        assert batch.texts[i] == one.texts[0]
        assert (batch.probs[i] is None) == (one.probs[0] is None)
        if one.probs[0] is not None:
            torch.testing.assert_close(batch.probs[i], one.probs[0], atol=1e-3, rtol=0)
            assert batch.scores[i] == pytest.approx(one.scores[0], abs=1e-3)


def seg_schedules(model: VMADModel) -> list[list[int]]:
    """Sample 0 emits <seg> first, sample 1 after two words, sample 2 never is forced."""
    word = model.tokenizer.convert_tokens_to_ids("ĠYes")
    return [[model.seg_token_id], [word, word, model.seg_token_id], []]


# ------------------------------------------------------------------------------------------ tiny preset


def test_segment_batch_equals_one_by_one(tiny: VMADModel) -> None:
    images = torch.rand(3, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    batch = tiny.segment(images, QUESTIONS)
    for i in range(3):
        one = tiny.segment(images[i : i + 1], QUESTIONS[i])
        torch.testing.assert_close(batch.probs[i], one.probs[0], atol=1e-3, rtol=0)
        assert float(batch.scores[i]) == pytest.approx(float(one.scores[0]), abs=1e-3)
    other = tiny.segment(images.flip(0), QUESTIONS[::-1])  # order of the batch does not matter either
    torch.testing.assert_close(other.probs.flip(0), batch.probs, atol=1e-3, rtol=0)


def test_generate_left_padded_batch_equals_one_by_one(
    tiny: VMADModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch, singles = generate_each(tiny, monkeypatch, images, seg_schedules(tiny), tokens=8)
    assert batch.probs[0] is not None and batch.probs[1] is not None  # <seg> at steps 0 and 2
    assert len({len(tiny.tokenizer(q)["input_ids"]) for q in QUESTIONS}) == 3  # really left padded
    assert_same_answers(batch, singles)
    assert batch.encoded is not None and batch.encoded.embeddings is not None  # backbone run once, batched
    assert batch.encoded.embeddings.shape[0] == 3


def test_mask_prompt_fed_at_different_steps_batch_equals_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mask_prompt_model()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    batch, singles = generate_each(model, monkeypatch, images, seg_schedules(model), tokens=8)
    assert_same_answers(batch, singles)
    # the free tokens after <seg> are conditioned on the mask prompt, fed at step 0 for one sample only
    assert len(batch.token_ids[0]) > 1


@pytest.mark.parametrize("with_mask_prompt", [False, True])
def test_static_cache_decodes_like_the_dynamic_cache(
    tiny: VMADModel, monkeypatch: pytest.MonkeyPatch, with_mask_prompt: bool
) -> None:
    model = mask_prompt_model() if with_mask_prompt else tiny
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    force_rows(model, monkeypatch, seg_schedules(model))
    dynamic = model.generate(images, QUESTIONS, max_new_tokens=8)
    monkeypatch.undo()
    model.decode_options.static_cache = True
    try:
        runs = []
        for _ in range(2):  # the second call reuses the first one's cache, reset
            force_rows(model, monkeypatch, seg_schedules(model))
            runs.append(model.generate(images, QUESTIONS, max_new_tokens=8))
            monkeypatch.undo()
        assert len([k for k in model.decode_options.compiled if k.startswith("cache:")]) == 1
    finally:
        model.decode_options.static_cache = False
        model.decode_options.compiled.clear()
    static = runs[1]
    assert runs[0].token_ids == static.token_ids == dynamic.token_ids
    for a, b in zip(static.probs, dynamic.probs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_ignore_stop_decodes_exactly_max_new_tokens(tiny: VMADModel, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = tiny.tokenizer.eos_token_id
    force_rows(tiny, monkeypatch, [[eos] * 8])
    assert len(tiny.generate(torch.rand(1, 3, 64, 64), TEXT_Q, max_new_tokens=5).token_ids[0]) == 1
    full = tiny.generate(torch.rand(1, 3, 64, 64), TEXT_Q, max_new_tokens=5, ignore_stop=True)
    assert len(full.token_ids[0]) == 5


def test_segment_reuses_encoded_images(tiny: VMADModel, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    encoded = tiny.encode_images(images)
    expected = tiny.segment(images, SEG_Q)
    calls = {"n": 0}
    original = tiny.vision_encoder.forward

    def counted(x: torch.Tensor) -> object:
        calls["n"] += 1
        return original(x)

    monkeypatch.setattr(tiny.vision_encoder, "forward", counted)
    again = tiny.segment(images, SEG_Q, encoded=encoded)
    assert calls["n"] == 0  # no encoder ran
    torch.testing.assert_close(again.probs, expected.probs, atol=1e-6, rtol=0)


def test_detector_batch_size_does_not_change_results(tiny: VMADModel) -> None:
    from vmad.infer import Detector
    from vmad.infer.detector import DetectorConfig

    images = [random_rgb(40, 56, seed=i) for i in range(5)] + [random_rgb(32, 32, seed=9)]  # two sizes
    results = {}
    for bs in (1, 4):
        detector = Detector(tiny, DetectorConfig(batch_size=bs, max_new_tokens=6))
        results[bs] = detector.detect(images, answer=True, class_name="bottle")
    for one, many in zip(results[1], results[4], strict=True):
        assert one.answer == many.answer
        assert one.mask_from == many.mask_from
        assert np.abs(one.probability_map - many.probability_map).max() <= 1e-3
        assert one.anomaly_score == pytest.approx(many.anomaly_score, abs=1e-3)


# ------------------------------------------------------------------------------------------ small model


@pytest.fixture(scope="module")
def small_model(smol_cache: Path) -> VMADModel:
    from vmad.infer import Detector

    return Detector.from_pretrained("small", device="cpu").model


def test_small_segment_batch_equals_one_by_one(small_model: VMADModel) -> None:
    images = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    batch = small_model.segment(images, QUESTIONS)
    for i in range(3):
        one = small_model.segment(images[i : i + 1], QUESTIONS[i])
        torch.testing.assert_close(batch.probs[i], one.probs[0], atol=1e-3, rtol=0)
        assert float(batch.scores[i]) == pytest.approx(float(one.scores[0]), abs=1e-3)


def test_small_generate_batch_equals_one_by_one(small_model: VMADModel) -> None:
    """The real answers: left padding over three prompt lengths, masks from each sample's own <seg> (the
    small model answers the segmentation question with <seg>, fed back through its mask prompt)."""
    images = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(6))
    batch = small_model.generate(images, QUESTIONS, max_new_tokens=10)
    singles = [small_model.generate(images[i : i + 1], QUESTIONS[i], max_new_tokens=10) for i in range(3)]
    assert batch.probs[0] is not None  # "It is <seg>. ..."
    assert_same_answers(batch, singles)
