"""Instruction data: the paper's three training task types (Sec. V-A.2) built from one sample.

1. Segmentation only, the paper's template verbatim with the object name filled in::

       USER: <image> Are there any abnormalities present in the OBJECT? If so, please output the defect
       segmentation result. ASSISTANT: It is <seg>.

2. Segmentation + answer: "... segmentation result and provide the QUERY TYPE." answered
   "It is <seg>. ANSWERING", QUERY TYPE one of description / impact analysis / suggestion analysis
   (``QUERY_TYPES``) and ANSWERING the sample's answer of that kind (RIAD answers, Sec. IV).
3. VQA: the paper generates question-answer pairs from the defect descriptions with GPT-4; OURS instead
   templates them (``VQA_QUESTIONS``: defect type, location, normal or not, count, size, description) with
   answers derived from the record and its mask (location in a 3x3 grid, size, count: :mod:`vmad.data.text`).
4. OURS, off by default (ratio 0): referring segmentation by defect kind, ``KIND_QUESTION`` ("Is there a
   scratch on the OBJECT? If so, please output its segmentation result." -> "It is <seg>."), whose mask is
   that kind's pixels only (empty when the image has none). The training set paints the kinds on normal
   images (:mod:`vmad.train.dataset`); the kind reaches the mask only through the ``<seg>`` state.

Tokens are written as the strings ``IMAGE_TOKEN`` and ``SEG_TOKEN``; the model maps them to special tokens.

Normal images (OURS): segmentation-only still answers "It is <seg>." and its mask target is empty;
segmentation + answer answers "It is <seg>. " followed by the sample's normal answer when the record has
one (the RIAD builder writes them) and otherwise :func:`vmad.data.text.normal_answers` ("No defect was
found ..."); VQA answers say that there is no defect. Task mixing ratios are OURS (the paper gives none).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vmad.data.io import read_mask
from vmad.data.records import Sample
from vmad.data.text import (
    MaskFacts,
    defect_name,
    describe_location,
    describe_size,
    mask_facts,
    number_word,
    object_name,
    size_adjective,
)
from vmad.data.text import normal_answers as default_normal_answers
from vmad.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<seg>"

TASKS: tuple[str, ...] = ("seg", "seg_answer", "vqa", "seg_kind")
# Answer key of a RIAD record -> the QUERY TYPE wording of the paper's template.
QUERY_TYPES: dict[str, str] = {
    "description": "description",
    "impact": "impact analysis",
    "suggestion": "suggestion analysis",
}

SEG_QUESTION = (
    "Are there any abnormalities present in the {object}? If so, please output the defect segmentation "
    "result."
)
SEG_ANSWER_QUESTION = (
    "Are there any abnormalities present in the {object}? If so, please output the defect segmentation "
    "result and provide the {query_type}."
)
SEG_ANSWER = "It is {seg}."
KIND_QUESTION = "Is there a {kind} on the {object}? If so, please output its segmentation result."


@dataclass(frozen=True)
class Conversation:
    """One training example: the user turn (with ``IMAGE_TOKEN``), the assistant turn, whether the answer
    holds ``SEG_TOKEN`` (a mask target), and the task (one of ``TASKS``)."""

    question: str
    answer: str
    has_seg: bool
    task: str

    def render(self) -> str:
        """The paper's single-line form ``USER: ... ASSISTANT: ...``."""
        return f"USER: {self.question} ASSISTANT: {self.answer}"


@dataclass(frozen=True)
class TaskRatios:
    """Relative frequencies of the task types (OURS; normalised by their sum, which must be > 0);
    ``seg_kind`` (referring segmentation by kind, OURS) is 0 unless asked for."""

    seg: float = 1.0
    seg_answer: float = 1.0
    vqa: float = 1.0
    seg_kind: float = 0.0

    def __post_init__(self) -> None:
        values = (self.seg, self.seg_answer, self.vqa, self.seg_kind)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(f"task ratios must be finite and >= 0, got {values}")
        if sum(values) <= 0:
            raise ConfigError("task ratios must sum to more than 0")

    def probabilities(self) -> dict[str, float]:
        total = self.seg + self.seg_answer + self.vqa + self.seg_kind
        return {task: getattr(self, task) / total for task in TASKS}


Rng = np.random.Generator | random.Random


def _uniform(rng: Rng) -> float:
    return float(rng.random())


def _index(rng: Rng, n: int) -> int:
    return int(rng.integers(n)) if isinstance(rng, np.random.Generator) else rng.randrange(n)


# ----------------------------------------------------------------------------------------- templates


def _user(text: str) -> str:
    return f"{IMAGE_TOKEN} {text}"


def seg_conversation(sample: Sample) -> Conversation:
    """Task 1 (segmentation only), the paper's template."""
    question = _user(SEG_QUESTION.format(object=object_name(sample.class_name)))
    return Conversation(question, SEG_ANSWER.format(seg=SEG_TOKEN), True, "seg")


def sample_answers(sample: Sample) -> dict[str, str]:
    """The record's three answers; for a normal record without them, the "no defect" answers (OURS).
    An anomalous record without answers is an error (RIAD requires them)."""
    if sample.answers:
        return sample.answers
    if sample.is_anomalous:
        raise DataError(
            sample.image_path, "anomalous sample without text answers (build a RIAD dataset first)"
        )
    return default_normal_answers(sample.class_name)


def seg_answer_conversation(sample: Sample, query: str) -> Conversation:
    """Task 2 (segmentation + answer) for ``query`` in ``QUERY_TYPES`` (description, impact, suggestion)."""
    if query not in QUERY_TYPES:
        raise ConfigError(f"query must be one of {', '.join(QUERY_TYPES)}, got {query!r}")
    question = _user(
        SEG_ANSWER_QUESTION.format(object=object_name(sample.class_name), query_type=QUERY_TYPES[query])
    )
    answer = f"{SEG_ANSWER.format(seg=SEG_TOKEN)} {sample_answers(sample)[query]}"
    return Conversation(question, answer, True, "seg_answer")


def kind_question(class_name: str, kind: str) -> str:
    """``KIND_QUESTION`` for defect ``kind`` (e.g. ``missing_piece``: "missing piece") on ``class_name``."""
    return KIND_QUESTION.format(kind=defect_name(kind), object=object_name(class_name))


def kind_conversation(class_name: str, kind: str) -> Conversation:
    """Task 4 (OURS): referring segmentation of defect ``kind`` (:func:`kind_question`)."""
    answer = SEG_ANSWER.format(seg=SEG_TOKEN)
    return Conversation(_user(kind_question(class_name, kind)), answer, True, "seg_kind")


# ------------------------------------------------------------------------------------------------ VQA


def _facts(sample: Sample, mask: np.ndarray | None) -> MaskFacts | None:
    if not sample.is_anomalous:
        return None
    return mask_facts(read_mask(sample) if mask is None else mask)


def _defect(sample: Sample, article: bool = True) -> str:
    """ "a blowhole defect" / "blowhole defect" (the record's defect type in words)."""
    name = f"{defect_name(sample.defect_type)} defect"
    if not article:
        return name
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _vqa_type(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if not sample.is_anomalous:
        return f"There is no defect on the {obj}; it is normal."
    return f"It is {_defect(sample)}."


def _vqa_where(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if not sample.is_anomalous:
        return f"There is no defect on the {obj}."
    f = facts()
    if f is None:
        return f"The {obj} has {_defect(sample)}, but its location is not marked."
    return f"The {_defect(sample, article=False)} is at {describe_location(f)} of the {obj}."


def _vqa_normal(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if not sample.is_anomalous:
        return f"Yes, the {obj} is normal; no defect was found."
    f = facts()
    where = f" at {describe_location(f)}" if f is not None else ""
    return f"No, the {obj} is not normal: it has {_defect(sample)}{where}."


def _vqa_count(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if not sample.is_anomalous:
        return f"There are no defect regions; the {obj} is normal."
    f = facts()
    if f is None:
        return "The defect regions are not marked in the annotation."
    n = number_word(f.count)
    return f"There is {n} defect region." if f.count == 1 else f"There are {n} defect regions."


def _vqa_size(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if not sample.is_anomalous:
        return f"There is no defect on the {obj} to measure."
    f = facts()
    if f is None:
        return "The size of the defect is not marked in the annotation."
    return f"The {_defect(sample, article=False)} is {size_adjective(f)}: {describe_size(f)}."


def _vqa_describe(sample: Sample, obj: str, facts: Callable[[], MaskFacts | None]) -> str:
    if sample.is_anomalous:
        return sample_answers(sample)["description"]
    return sample.normal_description or sample_answers(sample)["description"]


# (question template, answer function); the question's {object} is the class name in words.
VQA_QUESTIONS: tuple[tuple[str, Callable[..., str]], ...] = (
    ("What type of defect is on the {object}?", _vqa_type),
    ("Where is the defect located?", _vqa_where),
    ("Is the {object} normal?", _vqa_normal),
    ("How many defect regions are there?", _vqa_count),
    ("How large is the defect?", _vqa_size),
    ("Describe the {object} in the image.", _vqa_describe),
)


def vqa_conversation(
    sample: Sample, rng: Rng, mask: np.ndarray | None = None, index: int | None = None
) -> Conversation:
    """Task 3 (VQA): question ``index`` of ``VQA_QUESTIONS`` (None: drawn with ``rng``). ``mask`` is the
    sample's binary mask (read from disk when needed and not given)."""
    if index is None:
        index = _index(rng, len(VQA_QUESTIONS))
    template, answer_of = VQA_QUESTIONS[index]
    obj = object_name(sample.class_name)
    cache: list[MaskFacts | None] = []

    def facts() -> MaskFacts | None:
        if not cache:
            cache.append(_facts(sample, mask))
        return cache[0]

    return Conversation(_user(template.format(object=obj)), answer_of(sample, obj, facts), False, "vqa")


def choose_task(rng: Rng, ratios: TaskRatios) -> str:
    """One of ``TASKS`` with probability proportional to its ratio."""
    u, acc = _uniform(rng), 0.0
    probabilities = ratios.probabilities()
    for task in TASKS:
        acc += probabilities[task]
        if u < acc and probabilities[task] > 0:
            return task
    return next(t for t in reversed(TASKS) if probabilities[t] > 0)


def conversation_for(task: str, sample: Sample, rng: Rng, mask: np.ndarray | None = None) -> Conversation:
    """One training example of ``task`` (one of the paper's three; ``seg_kind`` examples need a painted
    image and are built by :class:`vmad.train.dataset.InstructionDataset`)."""
    if task == "seg":
        return seg_conversation(sample)
    if task == "seg_answer":
        return seg_answer_conversation(sample, tuple(QUERY_TYPES)[_index(rng, len(QUERY_TYPES))])
    if task == "vqa":
        return vqa_conversation(sample, rng, mask)
    raise ConfigError(f"task {task!r}: conversation_for makes only {', '.join(TASKS[:3])}")


def build_conversation(
    sample: Sample, rng: Rng, ratios: TaskRatios = TaskRatios(), mask: np.ndarray | None = None
) -> Conversation:
    """One training example of a task drawn by ``ratios`` (Sec. V-A.2): segmentation only,
    segmentation + one of the three answers (query type drawn uniformly), or VQA (question drawn
    uniformly). ``rng`` is a NumPy Generator or ``random.Random``; the same seed gives the same example."""
    return conversation_for(choose_task(rng, ratios), sample, rng, mask)
