"""The prompt and chat format of each LLM family, in one place: system text, roles, the ``<image>``
placeholder, stop tokens and how earlier turns of a conversation are folded into the prompt.

- ``paper`` (LLaVA-1.5 / Vicuna v1, the paper's Sec. V-A.2 template):
  ``"{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>"``;
- ``chatml`` (SmolLM2's chat template), the image placeholder at the start of the first user turn.

:func:`tokenize_dialogues` turns questions and answers into ids and labels with the chosen format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatFormat:
    """LLaVA v1 layout (``template: paper``); subclasses override the markup.

    ``joint_tokenization`` (a class attribute): :func:`tokenize_dialogues` tokenises prompt and answer as
    ONE string, as LLaVA-1.5 was trained (its LLaMA SentencePiece tokenizer gives a separately tokenised
    ``" It is <seg>.</s>"`` a stray ``"▁"`` piece that the same text inside the conversation does not have),
    and finds the supervised tokens by their offsets."""

    system: str
    image_token: str
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens besides the tokenizer's eos
    joint_tokenization: ClassVar[bool] = True

    def prompt(self, question: str) -> str:
        """The first turn up to where the answer starts."""
        return f"{self.system} USER: {self.image_token}\n{question} ASSISTANT:"

    def answer(self, answer: str, eos: str) -> str:
        """An answer as it follows :meth:`prompt`, closed by ``eos``."""
        return f" {answer}{eos}"

    def user_turn(self, question: str) -> str:
        """A later user turn, as it follows a closed answer."""
        return f"USER: {question}"

    def closed_answer(self, answer: str, eos: str) -> str:
        """An earlier answer inside a folded question, closed so that a user turn can follow."""
        return f" ASSISTANT:{self.answer(answer, eos)}"

    def fold_history(self, history: Sequence[tuple[str, str]], question: str, eos: str) -> str:
        """A question text that carries the earlier ``(question, answer)`` turns in this format's multi-turn
        markup; given to :meth:`prompt` it yields the whole conversation with the image in the first turn."""
        if not history:
            return question
        parts: list[str] = []
        for i, (earlier_question, earlier_answer) in enumerate(history):
            parts.append(earlier_question if i == 0 else self.user_turn(earlier_question))
            parts.append(self.closed_answer(earlier_answer, eos))
        return "".join(parts) + self.user_turn(question)


@dataclass(frozen=True)
class ChatMLFormat(ChatFormat):
    """ChatML (``template: chatml``): ``<|im_start|>role\\n...<|im_end|>`` turns.

    ``joint_tokenization`` is off: prompt and answer are tokenised separately, as the shipped VMAD-small
    weights (SmolLM2) were trained, evaluated and recorded. SmolLM2's byte-level BPE gives the same ids
    either way for answers that start with a non-space character (every answer VMAD writes), but an answer
    that starts with whitespace would merge, in the joint text, with the prompt's closing ``"\\n"`` into one
    token left out of the labels: the separate tokenisation keeps the shipped model's behaviour exact."""

    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    joint_tokenization: ClassVar[bool] = False

    def prompt(self, question: str) -> str:
        return (
            f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n{self.image_token}\n"
            f"{question}<|im_end|>\n<|im_start|>assistant\n"
        )

    def answer(self, answer: str, eos: str) -> str:
        return f"{answer}{eos}"

    def user_turn(self, question: str) -> str:
        return f"<|im_start|>user\n{question}"

    def closed_answer(self, answer: str, eos: str) -> str:
        return f"<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


CHAT_FORMATS: dict[str, type[ChatFormat]] = {"paper": ChatFormat, "chatml": ChatMLFormat}


def chat_format(template: str, system: str, image_token: str) -> ChatFormat:
    """The format of ``template`` (``llm.template``: ``paper`` or ``chatml``)."""
    return CHAT_FORMATS[template](system, image_token)


def stop_token_ids(tokenizer: object, fmt: ChatFormat) -> set[int]:
    """Ids that end an answer: the tokenizer's eos and the format's end-of-turn tokens it knows."""
    ids = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in fmt.stop_tokens)]
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def _joint_ids(tokenizer: object, prompt: str, answer: str) -> tuple[list[int], list[int]] | None:
    """Ids and labels of ``prompt + answer`` tokenised as ONE string (BOS once, by the tokenizer), or None
    when the tokenizer gives no offset mapping (slow tokenizers).

    The labels are the ids of the tokens whose character span starts at or after the answer's first
    character (and ends after it), -100 before: a token that straddles the boundary belongs to the prompt.
    The end condition keeps a whitespace token at the very end of the prompt, whose span a byte-level
    post-processor trims to the empty span at the boundary (``trim_offsets``), out of the labels."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(prompt + answer, add_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError:  # a tokenizer that says it is fast but has no offsets
        return None
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is None or len(offsets) != len(ids):
        return None
    start = len(prompt)
    labels = [
        int(i) if s >= start and e > start else IGNORE_INDEX for i, (s, e) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


def _separate_ids(tokenizer: object, prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
    """Prompt (with the tokenizer's special tokens) and answer (without) tokenised apart and concatenated."""
    p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    a_ids = [] if answer is None else list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids


def dialogue_ids(
    tokenizer: object, fmt: ChatFormat, question: str, answer: str | None
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one turn, unpadded (see :func:`tokenize_dialogues`)."""
    prompt = fmt.prompt(question)
    if answer is None:
        return _separate_ids(tokenizer, prompt, None)
    text = fmt.answer(answer, tokenizer.eos_token or "")
    if fmt.joint_tokenization:
        joint = _joint_ids(tokenizer, prompt, text)
        if joint is not None:
            return joint
    return _separate_ids(tokenizer, prompt, text)


def tokenize_dialogues(
    tokenizer: object,
    fmt: ChatFormat,
    questions: Sequence[str],
    answers: Sequence[str | None] | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Token ids for one turn per sample: prompt (ids masked with -100 in ``labels``) + answer + eos.

    With an answer and a format whose ``joint_tokenization`` is set (``paper``), the whole conversation
    ``fmt.prompt(q) + fmt.answer(a, eos)`` is tokenised as ONE string, as the LLM saw it in training (a
    SentencePiece tokenizer such as LLaMA's gives a separately tokenised ``" It is <seg>.</s>"`` a stray
    ``"▁"`` piece), and the labels are found by position through the tokenizer's offset mapping: the tokens
    whose span starts at or after the answer's first character. A tokenizer without offsets (a slow one)
    falls back to the separate tokenisation: prompt (with BOS) and answer tokenised apart and concatenated,
    so the supervised span is exact but the ids at the seam may differ from the joint text's.
    ``answers`` None (or a None entry) gives the prompt alone, ready for generation: the prompt tokenised by
    itself, with BOS. Padding (``pad_token_id``, else eos) goes on ``padding_side``."""
    answers = list(answers) if answers is not None else [None] * len(questions)
    if len(answers) != len(questions):
        raise ValueError("questions and answers differ in length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs: list[list[int]] = []
    labs: list[list[int]] = []
    for q, a in zip(questions, answers, strict=True):
        s, lab = dialogue_ids(tokenizer, fmt, q, a)
        seqs.append(s)
        labs.append(lab)
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), int(pad_id), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        span = slice(longest - len(s), longest) if padding_side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        labels[i, span] = torch.tensor(lab, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
