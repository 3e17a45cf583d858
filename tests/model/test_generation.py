"""Generation with the KV cache: masks from <seg>, text-only answers, answer log-probs against the text
loss, and the mask prompt against teacher forcing; tiny preset."""

from __future__ import annotations

import pytest
import torch

from vmad.errors import VMADError
from vmad.model.vmad import VMADModel
from vmad_testing import SEG_Q, TEXT_Q, force_logits, loss_dict, mask_prompt_model


def test_generate_yields_mask_of_input_size_matching_fast_path(
    tiny: VMADModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny
    answer = model.chat_format.answer(model.config.llm.seg_answer, model.tokenizer.eos_token)
    tokens = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert model.seg_token_id in tokens
    force_logits(model, monkeypatch, tokens)
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
    force_logits(tiny, monkeypatch, [word, eos])
    gen = tiny.generate(torch.rand(2, 3, 64, 64), [TEXT_Q, "Is it normal?"], max_new_tokens=8)
    assert gen.texts == ["Yes", "Yes"] and gen.probs == [None, None] and gen.scores == [None, None]


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


def test_mask_prompt_generation_matches_teacher_forcing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding with the KV cache (mask prompt fed after <seg>, other samples' slots masked) gives the same
    per-token log-probs as the two-pass teacher-forced path, for a left-padded batch of two questions."""
    model = mask_prompt_model()
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


def test_forced_prefix_opens_the_answer_then_greedy_goes_on(tiny: VMADModel) -> None:
    images = torch.rand(2, 3, 48, 64)
    free = tiny.generate(images, SEG_Q, max_new_tokens=6, ignore_stop=True)
    seg_answer = tiny.config.llm.seg_answer
    forced = tiny.generate(images, SEG_Q, max_new_tokens=12, ignore_stop=True,
                           prefixes=[seg_answer, None])
    opening = tiny.tokenizer(seg_answer, add_special_tokens=False)["input_ids"]
    assert forced.token_ids[0][: len(opening)] == opening
    assert forced.probs[0] is not None  # the forced <seg> decodes a mask
    # the free sample decodes exactly as without prefixes
    assert forced.token_ids[1][:6] == free.token_ids[1]
    # a forced answer equals teacher forcing: the mask matches the fast path's
    fast = tiny.segment(images[:1], SEG_Q)
    torch.testing.assert_close(forced.probs[0], fast.probs[0], atol=1e-4, rtol=0)
    with pytest.raises(VMADError, match="prefixes / avoid has 1 entries for 2 images"):
        tiny.generate(images, SEG_Q, max_new_tokens=2, prefixes=[None])
