"""Detector API (detect, chat, loading), the eval scorer and the mask description, with the random tiny
model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vmad.cli import main
from vmad.data.prompts import SEG_QUESTION
from vmad.errors import ConfigError, VMADError
from vmad.infer.detector import Detection, Detector, DetectorConfig, build_scorer, resolve_model_path
from vmad.model import weights_io
from vmad.model.build import build_vmad
from vmad.model.chat_format import ChatMLFormat
from vmad.model.outputs import GenerationResult
from vmad_testing import random_rgb

# ------------------------------------------------------------------------------------------ detect


def test_detect_returns_input_sized_masks_for_mixed_inputs(tiny_model, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(random_rgb(21, 37, 3)).save(path)
    inputs = [
        random_rgb(24, 32),                                                   # RGB array
        np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8),  # grayscale array
        Image.fromarray(random_rgb(17, 50, 2)),                               # PIL image
        torch.rand(3, 24, 32),                                                # tensor in [0, 1]
        path,                                                                 # file
    ]
    det = Detector(tiny_model, DetectorConfig(batch_size=3))
    out = det.detect(inputs)
    assert [d.size for d in out] == [(24, 32), (40, 30), (17, 50), (24, 32), (21, 37)]
    for d in out:
        assert d.mask.dtype == bool and d.probability_map.dtype == np.float32
        assert np.array_equal(d.mask, d.probability_map > 0.5)
        assert d.answer is None and d.mask_from == "segment"
        assert 0.0 <= d.anomaly_score <= 1.0
    assert out[4].source == str(path) and out[0].source is None
    # Batching (same-size grouping) gives what one-by-one processing gives.
    single = det.detect(inputs[1])
    assert len(single) == 1
    np.testing.assert_allclose(single[0].probability_map, out[1].probability_map, atol=1e-5)
    assert single[0].anomaly_score == pytest.approx(out[1].anomaly_score, abs=1e-5)


def test_detect_uses_model_score_and_default_question(tiny_model, monkeypatch):
    det = Detector(tiny_model)
    seen: list[str] = []
    real = tiny_model.segment

    def spy(images, question):
        seen.append(question)
        return real(images, question)

    monkeypatch.setattr(tiny_model, "segment", spy)
    img = random_rgb(24, 32)
    [d] = det.detect(img, class_name="metal_plate")
    assert seen[-1] == SEG_QUESTION.format(object="metal plate")
    det.detect(img)
    assert seen[-1] == SEG_QUESTION.format(object="object")
    ref = real(torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255, seen[0])
    assert d.anomaly_score == pytest.approx(float(ref.scores[0]), abs=1e-6)
    np.testing.assert_allclose(d.probability_map, ref.probs[0].numpy(), atol=1e-6)
    assert "provide the description" in det.default_question("bottle", answer=True)


@pytest.mark.parametrize("threshold, expect", [(0.0, True), (1.0, False)])
def test_threshold_is_configurable(tiny_model, threshold, expect):
    [d] = Detector(tiny_model, DetectorConfig(threshold=threshold)).detect(random_rgb(16, 16))
    assert bool(d.mask.all()) is expect and bool(d.mask.any()) is expect


def test_config_validation():
    with pytest.raises(ConfigError):
        DetectorConfig(threshold=1.5).validate()
    with pytest.raises(ConfigError):
        DetectorConfig(answer_query="poem").validate()
    with pytest.raises(VMADError):
        Detector(build_vmad("tiny")).detect(np.zeros((4, 4, 2), dtype=np.uint8))


def test_answer_mode_mask_from_answer_or_segment_fallback(tiny_model, monkeypatch):
    det = Detector(tiny_model)
    real_segment = tiny_model.segment
    p0 = torch.full((24, 32), 0.9)

    def fake_generate(images, question, max_new_tokens=64):
        assert images.shape[0] == 2 and "provide the description" in question
        texts = ["It is <seg>. A scratch.", "No defect."]
        return GenerationResult(texts, [[1], [2]], [p0, None], [0.9, None])

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    imgs = [random_rgb(24, 32, 0), random_rgb(24, 32, 1)]
    a, b = det.detect(imgs, answer=True, class_name="bottle")
    assert a.mask_from == "answer" and a.anomaly_score == pytest.approx(0.9) and a.mask.all()
    assert a.answer == "It is <seg>. A scratch."
    assert b.mask_from == "segment" and b.answer == "No defect."
    ref = real_segment(torch.from_numpy(imgs[1]).permute(2, 0, 1).float()[None] / 255,
                       SEG_QUESTION.format(object="bottle"))
    np.testing.assert_allclose(b.probability_map, ref.probs[0].numpy(), atol=1e-6)


def test_answer_mode_real_generation(tiny_model):
    det = Detector(tiny_model, DetectorConfig(max_new_tokens=4))
    out = det.detect([random_rgb(24, 32), random_rgb(30, 20)], answer=True)
    assert [d.size for d in out] == [(24, 32), (30, 20)]
    assert all(isinstance(d.answer, str) for d in out)


# ------------------------------------------------------------------------------------------ chat


def test_chat_folds_history_into_the_prompt(tiny_model, monkeypatch):
    det = Detector(tiny_model, DetectorConfig(max_new_tokens=4))
    asked: list[str] = []
    real = tiny_model.generate

    def spy(images, question, max_new_tokens=64):
        asked.append(question)
        return real(images, question, max_new_tokens)

    monkeypatch.setattr(tiny_model, "generate", spy)
    img = random_rgb(24, 32)
    t1 = det.chat(img, None, "Is there a defect?")
    t2 = det.chat(img, t1.history, "Where is it?")
    assert asked[0] == "Is there a defect?"
    assert asked[1] == f"Is there a defect? ASSISTANT: {t1.answer}</s>USER: Where is it?"
    prompt = tiny_model.chat_format.prompt(asked[1])
    expected = f"USER: <image>\nIs there a defect? ASSISTANT: {t1.answer}</s>USER: Where is it? ASSISTANT:"
    assert prompt.endswith(expected)
    assert t2.history == [("Is there a defect?", t1.answer), ("Where is it?", t2.answer)]
    assert t2.detection.size == (24, 32) and t2.detection.question == "Where is it?"


def test_chat_history_in_chatml_markup(tiny_model, monkeypatch):
    det = Detector(tiny_model)
    monkeypatch.setattr(tiny_model, "chat_format", ChatMLFormat("sys", "<image>"))
    folded = det.fold_history([("q1", "a1"), ("q2", "a2")], "q3")
    prompt = tiny_model.chat_format.prompt(folded)
    assert prompt == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<image>\nq1<|im_end|>\n<|im_start|>assistant\n"
        "a1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
        "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------ loading


def test_from_pretrained_loads_the_trained_parts(tiny_model, tiny_ckpt):
    det = Detector.from_pretrained(tiny_ckpt, device="cpu")
    img = random_rgb(24, 32)
    [a] = det.detect(img)
    [b] = Detector(tiny_model).detect(img)
    np.testing.assert_allclose(a.probability_map, b.probability_map, atol=1e-6)


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "packaged_weights_dir", lambda name="small": tmp_path / "absent")
    with pytest.raises(VMADError, match="packaged 'small' weights are not installed"):
        resolve_model_path("small")
    with pytest.raises(VMADError, match="no such model folder"):
        Detector.from_pretrained(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(VMADError, match=r"missing model\.safetensors"):
        build_scorer(tmp_path / "half")


# ------------------------------------------------------------------------------------------ eval scorer


def test_build_scorer_in_vmad_eval(tiny_ckpt, tiny_mvtec, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_ckpt), "--data", str(tiny_mvtec), "--out", str(out), "--json"]
    rc = main([*argv, "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(capsys.readouterr().out)
    row = results["classes"]["widget"]
    assert row["n_normal"] == 2 and row["n_anomalous"] == 3
    assert 0.0 <= row["pixel_auroc"] <= 1.0
    scorer = results["scorer"]
    assert scorer["name"] == "vmad-final"
    assert scorer["settings"]["question_template"] == SEG_QUESTION
    assert scorer["settings"]["score_rule"]["rule"] == "max_smoothed"


def test_scorer_matches_detector(tiny_model, tiny_ckpt):
    scorer = build_scorer(str(tiny_ckpt), batch_size="2")
    assert scorer.detector is None and scorer.config.batch_size == 2
    scorer.prepare()
    imgs = [random_rgb(24, 32, i) for i in range(3)]
    out = scorer.score(imgs, "widget")
    dets = Detector(tiny_model).detect(imgs, class_name="widget")
    np.testing.assert_allclose(out.image_scores, [d.anomaly_score for d in dets], atol=1e-6)
    assert [m.shape for m in out.anomaly_maps] == [(24, 32)] * 3


# ------------------------------------------------------------------------------------------ render


def test_mask_description_is_computed_from_the_mask():
    mask = np.zeros((90, 90), dtype=bool)
    empty = Detection(0.1, mask.copy(), np.zeros((90, 90), np.float32))
    assert empty.mask_description == "The mask is empty: no pixel is above the threshold."
    mask[5:15, 70:85] = True  # upper right, 15 x 10 px
    mask[70:80, 2:6] = True  # lower left
    det = Detection(0.9, mask, mask.astype(np.float32))
    assert det.mask_description == (
        "The mask marks two regions at the upper right and the lower left "
        "(about 83 x 75 px, 2.3 % of the image)."
    )
    assert det.summary()["mask_description"] == det.mask_description


def test_evidence_verdict_fixes_the_answer_opening(tiny_model):
    from vmad.infer.detector import NORMAL_OPENING

    imgs = [random_rgb(24, 32, 0), random_rgb(24, 32, 1)]
    seg = Detector(tiny_model).detect(imgs)
    scores = [d.anomaly_score for d in seg]
    # image threshold between the two scores: one verdict of each kind
    cut = sum(scores) / 2
    config = DetectorConfig(max_new_tokens=24, answer_verdict="evidence", image_threshold=cut)
    out = Detector(tiny_model, config).detect(imgs, answer=True)
    normal_start = f"It is <seg>. {NORMAL_OPENING}"
    for d, s, ref in zip(out, scores, seg, strict=True):
        assert d.answer.startswith("It is <seg>.") and d.mask_from == "answer"
        assert d.answer.startswith(normal_start) == (s <= cut)
        assert d.verdict == ("anomalous" if s > cut else "normal")
        # the mask of the forced <seg> is the segmentation-only mask
        np.testing.assert_allclose(d.probability_map, ref.probability_map, atol=1e-4)
    # without an image threshold a non-empty binary mask is the verdict
    config.image_threshold, config.threshold = None, 1.0
    out = Detector(tiny_model, config).detect(imgs, answer=True)
    assert all(d.answer.startswith(normal_start) for d in out)
    with pytest.raises(ConfigError):
        DetectorConfig(answer_verdict="llm").validate()


def test_evidence_verdict_only_for_the_default_answer_question(tiny_model, monkeypatch):
    seen: list[bool] = []
    generate = tiny_model.generate

    def spy(*args, **kwargs):
        seen.append("prefixes" in kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy)
    det = Detector(tiny_model, DetectorConfig(max_new_tokens=4, answer_verdict="evidence", threshold=1.0))
    img = random_rgb(24, 32, 0)
    det.detect(img, answer=True)
    det.detect(img, answer=True, question="What colour is it?")
    turn = det.chat(img, None, det.default_question(answer=True), max_new_tokens=4)
    det.chat(img, turn.history, det.default_question(answer=True), max_new_tokens=4)
    # forced: the default question, alone or as the first chat turn; free: other questions, follow-ups
    assert seen == [True, False, True, False]


def test_avoid_bans_the_opening_after_the_prefix(tiny_model, monkeypatch):
    from vmad_testing import force_logits

    no = tiny_model.tokenizer(" No", add_special_tokens=False)["input_ids"]
    eos = tiny_model.tokenizer.eos_token_id
    force_logits(tiny_model, monkeypatch, [no[0], eos])  # the model would answer " No" at once
    gen = tiny_model.generate(torch.rand(1, 3, 24, 32), "q", max_new_tokens=3, avoid=[" No defect"])
    assert gen.token_ids[0][0] != no[0]
