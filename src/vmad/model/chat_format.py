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

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatFormat:
    """LLaVA v1 layout (``template: paper``); subclasses override the markup."""

    system: str
    image_token: str
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens besides the tokenizer's eos

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
    """ChatML (``template: chatml``): ``<|im_start|>role\\n...<|im_end|>`` turns."""

    stop_tokens: tuple[str, ...] = ("<|im_end|>",)

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


def tokenize_dialogues(
    tokenizer: object,
    fmt: ChatFormat,
    questions: Sequence[str],
    answers: Sequence[str | None] | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Token ids for one turn per sample: prompt (ids masked with -100 in ``labels``) + answer + eos.

    Prompt and answer are tokenised separately and concatenated, so the supervised span is exact.
    ``answers`` None (or a None entry) gives the prompt alone, ready for generation."""
    answers = list(answers) if answers is not None else [None] * len(questions)
    if len(answers) != len(questions):
        raise ValueError("questions and answers differ in length")
    eos = tokenizer.eos_token or ""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs: list[list[int]] = []
    labs: list[list[int]] = []
    for q, a in zip(questions, answers, strict=True):
        p_ids = tokenizer(fmt.prompt(q), add_special_tokens=True)["input_ids"]
        a_ids = [] if a is None else tokenizer(fmt.answer(a, eos), add_special_tokens=False)["input_ids"]
        seqs.append(list(p_ids) + list(a_ids))
        labs.append([IGNORE_INDEX] * len(p_ids) + list(a_ids))
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), int(pad_id), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        span = slice(longest - len(s), longest) if padding_side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        labels[i, span] = torch.tensor(lab)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
