"""The tiny tokenizer: deterministic and lossless."""

from __future__ import annotations

from vmad.model.llm import build_tiny_tokenizer


def test_tiny_tokenizer_is_deterministic_and_lossless() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "USER: Are there any abnormalities present in the Bottle? ü 3.5"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text and len(ids) < len(text)
