"""`tokenize_dialogues`: the answer's ids are those of the same text inside the whole conversation (issue 13,
item 6), with a LLaMA-style SentencePiece tokenizer (LLaVA-1.5's kind) trained here on a few sentences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmad.model.chat_format import IGNORE_INDEX, ChatFormat, ChatMLFormat, tokenize_dialogues
from vmad.model.llm import build_tiny_tokenizer

SYSTEM = "A chat between a curious human and an artificial intelligence assistant."
QUESTIONS = [
    "Are there any abnormalities present in the bottle? If so, please output the defect segmentation result.",
    "Is it normal?",
]
ANSWERS = ["It is <seg>.", "No.", "Yes, there is a crack on the thread. It is <seg>.", "<seg>", "12 holes"]
TRAINING_TEXT = [
    SYSTEM,
    "USER: Are there any abnormalities present in the bottle? If so, please output the defect segmentation "
    "result. ASSISTANT: It is a scratch.",
    "It is broken. No defect was found. Yes, there is a crack on the thread.",
    "Is it normal? What is wrong with this screw? Describe the defect. There are 12 holes.",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece BPE model with LLaMA's trainer settings (byte fallback, split digits, identity
    normalisation, extra whitespace kept, dummy prefix) saved as ``tokenizer.model``."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("llama_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 5),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return folder


@pytest.fixture(scope="module")
def llama(sp_folder: Path) -> object:
    """``LlamaTokenizerFast`` of that model with LLaMA-2 / LLaVA-1.5's ``tokenizer.json`` pipeline (normaliser
    ``Prepend("▁")`` + ``Replace(" ", "▁")``, no pre-tokenizer: SentencePiece's own behaviour, checked against
    it below), BOS added, and ``<image>`` / ``<seg>`` as added special tokens."""
    from tokenizers import normalizers
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast.from_pretrained(sp_folder, add_bos_token=True, add_eos_token=False)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tok.add_tokens(["<image>", "<seg>"], special_tokens=True)
    return tok


def _fmt() -> ChatFormat:
    return ChatFormat(SYSTEM, "<image>")


def _rows(enc: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """Each sample's ids and labels without its padding."""
    out = []
    for ids, mask, labels in zip(enc["input_ids"], enc["attention_mask"], enc["labels"], strict=True):
        keep = mask.bool()
        out.append((ids[keep].tolist(), labels[keep].tolist()))
    return out


def _supervised(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


def test_the_test_tokenizer_is_sentencepiece(llama: object, sp_folder: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    for text in [" It is a scratch.", "ASSISTANT: It is", "Yes, there is a crack.\nIs it normal? 12", SYSTEM]:
        assert llama(text)["input_ids"] == [llama.bos_token_id, *sp.encode(text)]


def test_answer_labels_are_the_answer_inside_the_whole_conversation(llama: object) -> None:
    fmt, eos = _fmt(), llama.eos_token
    stray = []
    for q in QUESTIONS:
        enc = tokenize_dialogues(llama, fmt, [q] * len(ANSWERS), ANSWERS)
        for (ids, labels), a in zip(_rows(enc), ANSWERS, strict=True):
            full = llama(fmt.prompt(q) + fmt.answer(a, eos))["input_ids"]
            prompt = llama(fmt.prompt(q))["input_ids"]
            assert full[: len(prompt)] == prompt  # the prompt ends at a token boundary here
            assert ids == full and ids.count(llama.bos_token_id) == 1 and ids[0] == llama.bos_token_id
            assert labels == [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
            assert _supervised(labels)[-1] == llama.eos_token_id
            assert ("<seg>" in a) == (llama.convert_tokens_to_ids("<seg>") in _supervised(labels))
            separate = llama(fmt.answer(a, eos), add_special_tokens=False)["input_ids"]
            if separate != full[len(prompt) :]:
                stray.append(llama.convert_ids_to_tokens(separate)[0])
    # the old separate tokenisation gave the answers a stray "▁" that the conversation does not have
    assert stray and set(stray) == {"▁"}


def test_prompt_only_ids_are_the_prompt_tokenised_alone(llama: object) -> None:
    fmt = _fmt()
    enc = tokenize_dialogues(llama, fmt, QUESTIONS)
    for (ids, labels), q in zip(_rows(enc), QUESTIONS, strict=True):
        assert ids == llama(fmt.prompt(q), add_special_tokens=True)["input_ids"]
        assert set(labels) == {IGNORE_INDEX}
    mixed = tokenize_dialogues(llama, fmt, QUESTIONS, [None, "No."])
    assert _rows(mixed)[0] == _rows(enc)[0]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_rows_equal_single_samples_padded(llama: object, padding_side: str) -> None:
    fmt = _fmt()
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[1]]
    answers = ["Yes, there is a crack on the thread. It is <seg>.", None, "No."]
    enc = tokenize_dialogues(llama, fmt, questions, answers, padding_side=padding_side)
    singles = [tokenize_dialogues(llama, fmt, [q], [a]) for q, a in zip(questions, answers, strict=True)]
    longest = max(s["input_ids"].shape[1] for s in singles)
    assert tuple(enc["input_ids"].shape) == (3, longest)
    pad = llama.pad_token_id if llama.pad_token_id is not None else llama.eos_token_id
    for b, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        real = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        pads = slice(0, longest - n) if padding_side == "left" else slice(n, longest)
        assert enc["input_ids"][b, real].tolist() == single["input_ids"][0].tolist()
        assert enc["labels"][b, real].tolist() == single["labels"][0].tolist()
        assert enc["attention_mask"][b, real].tolist() == [1] * n
        assert set(enc["input_ids"][b, pads].tolist()) <= {pad}
        assert set(enc["attention_mask"][b, pads].tolist()) <= {0}
        assert set(enc["labels"][b, pads].tolist()) <= {IGNORE_INDEX}
    if padding_side == "left":  # every prompt ends at the last column, ready for generation
        assert enc["attention_mask"][:, -1].tolist() == [1, 1, 1]


class _NoOffsets:
    """A tokenizer without an offset mapping (as a slow tokenizer): everything else delegated."""

    is_fast = False

    def __init__(self, tok: object) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> object:
        return getattr(self._tok, name)

    def __call__(self, text: str, **kwargs: object) -> object:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._tok(text, **kwargs)


def _separate(tok: object, fmt: ChatFormat, q: str, a: str) -> tuple[list[int], list[int]]:
    p_ids = tok(fmt.prompt(q), add_special_tokens=True)["input_ids"]
    a_ids = tok(fmt.answer(a, tok.eos_token), add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids


def test_without_offsets_the_answer_is_tokenised_separately(llama: object) -> None:
    fmt = _fmt()
    enc = tokenize_dialogues(_NoOffsets(llama), fmt, QUESTIONS, ["It is <seg>.", "No."])
    assert _rows(enc) == [
        _separate(llama, fmt, q, a) for q, a in zip(QUESTIONS, ["It is <seg>.", "No."], strict=True)
    ]


def test_chatml_keeps_the_separate_tokenisation(llama: object) -> None:
    """The shipped VMAD-small weights (chatml) were trained with the answer tokenised apart."""
    fmt = ChatMLFormat(SYSTEM, "<image>")
    assert not fmt.joint_tokenization and _fmt().joint_tokenization
    enc = tokenize_dialogues(llama, fmt, QUESTIONS, ANSWERS[:2])
    assert _rows(enc) == [_separate(llama, fmt, q, a) for q, a in zip(QUESTIONS, ANSWERS[:2], strict=True)]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_byte_level_bpe_ids_are_unchanged(trim_offsets: bool) -> None:
    """The tiny preset's byte-level BPE (``paper`` format) gives the same ids jointly as apart; with a
    ByteLevel post-processor trimming whitespace out of the offsets, a lone "Ġ" before ``<seg>`` still
    counts as the answer's."""
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    if trim_offsets:
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.add_tokens(["<seg>", "<image>"], special_tokens=True)
    fmt = _fmt()
    questions = [QUESTIONS[0]] * len(ANSWERS)
    enc = tokenize_dialogues(tok, fmt, questions, ANSWERS)
    assert _rows(enc) == [_separate(tok, fmt, q, a) for q, a in zip(questions, ANSWERS, strict=True)]
