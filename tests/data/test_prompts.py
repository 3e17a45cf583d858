"""Instruction data (paper Sec. V-A.2): verbatim templates, task mixing ratios, normal vs anomalous
answers, VQA answers derived from the record."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vmad.data import load_dataset
from vmad.data.build_riad import build_riad
from vmad.data.prompts import (
    IMAGE_TOKEN,
    QUERY_TYPES,
    SEG_TOKEN,
    TASKS,
    VQA_QUESTIONS,
    Conversation,
    TaskRatios,
    build_conversation,
    choose_task,
    conversation_for,
    kind_conversation,
    seg_answer_conversation,
    seg_conversation,
    vqa_conversation,
)
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import ConfigError, DataError

ANSWERS = {
    "description": "A small hole is visible at the upper left of the metal plate.",
    "impact": "A hole weakens the plate.",
    "suggestion": "Check the press.",
}


def _anomalous(defect_type: str = "Blowhole", answers: dict | None = ANSWERS) -> Sample:
    return Sample(
        Path("a.png"), "metal_plate", ANOMALOUS, defect_type, "train", Path("a.json"), "coco:1", answers
    )


def _normal(answers: dict | None = None) -> Sample:
    return Sample(Path("n.png"), "metal_plate", NORMAL, "good", "train", answers=answers,
                  normal_description="A flat grey metal plate.")  # fmt: skip


def _paper(c: Conversation) -> str:
    """The conversation in the paper's spelling of the tokens."""
    return c.render().replace(IMAGE_TOKEN, "<IMAGE>").replace(SEG_TOKEN, "<SEG>")


MASK = np.zeros((90, 90), bool)
MASK[5:15, 5:20] = True  # upper left, one region


def test_tokens_and_templates_verbatim() -> None:
    assert (IMAGE_TOKEN, SEG_TOKEN) == ("<image>", "<seg>")
    for sample in (_anomalous(), _normal()):
        c = seg_conversation(sample)
        assert _paper(c) == (
            "USER: <IMAGE> Are there any abnormalities present in the metal plate? If so, please output the "
            "defect segmentation result. ASSISTANT: It is <SEG>."
        )
        assert c.has_seg and c.task == "seg" and c.answer == "It is <seg>."
    for key, query_type in (
        ("description", "description"),
        ("impact", "impact analysis"),
        ("suggestion", "suggestion analysis"),
    ):
        c = seg_answer_conversation(_anomalous(), key)
        assert _paper(c) == (
            "USER: <IMAGE> Are there any abnormalities present in the metal plate? If so, please output the "
            f"defect segmentation result and provide the {query_type}. ASSISTANT: It is <SEG>. {ANSWERS[key]}"
        )
        assert c.has_seg and c.task == "seg_answer"
    with pytest.raises(ConfigError):
        seg_answer_conversation(_anomalous(), "impact analysis")


def test_ratios_respected_and_deterministic() -> None:
    sample = _normal()
    ratios = TaskRatios(seg=2.0, seg_answer=1.0, vqa=1.0)
    rng = np.random.default_rng(123)
    draws = [build_conversation(sample, rng, ratios) for _ in range(2000)]
    freq = Counter(c.task for c in draws)
    assert abs(freq["seg"] / 2000 - 0.5) < 0.04
    assert abs(freq["seg_answer"] / 2000 - 0.25) < 0.04
    assert abs(freq["vqa"] / 2000 - 0.25) < 0.04
    rng = np.random.default_rng(123)
    assert [build_conversation(sample, rng, ratios) for _ in range(2000)] == draws
    # the query types and the VQA questions are all used
    assert len({c.question for c in draws if c.task == "seg_answer"}) == len(QUERY_TYPES)
    assert len({c.question for c in draws if c.task == "vqa"}) == len(VQA_QUESTIONS)

    only_vqa = TaskRatios(seg=0, seg_answer=0, vqa=0.3)
    py = random.Random(5)
    tasks = {build_conversation(sample, py, only_vqa).task for _ in range(200)}
    assert tasks == {"vqa"}
    a = [build_conversation(sample, random.Random(9), ratios) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert set(TaskRatios().probabilities()) == set(TASKS)


@pytest.mark.parametrize("values", [(0, 0, 0), (-1, 1, 1), (float("nan"), 1, 1), (1, float("inf"), 1)])
def test_ratios_validated(values) -> None:
    with pytest.raises(ConfigError):
        TaskRatios(*values)


def test_normal_and_anomalous_answers() -> None:
    normal, anomalous = _normal(), _anomalous()
    c = seg_answer_conversation(normal, "description")
    assert c.answer.startswith("It is <seg>. ") and "No defect was found" in c.answer and c.has_seg
    assert "No action is needed" in seg_answer_conversation(normal, "suggestion").answer
    own = {"description": "Nothing wrong.", "impact": "None.", "suggestion": "Ship it."}
    assert seg_answer_conversation(_normal(own), "impact").answer == "It is <seg>. None."
    assert seg_answer_conversation(anomalous, "suggestion").answer == f"It is <seg>. {ANSWERS['suggestion']}"
    with pytest.raises(DataError):
        seg_answer_conversation(_anomalous(answers=None), "description")

    rng = np.random.default_rng(0)
    is_normal = 2
    assert vqa_conversation(normal, rng, index=is_normal).answer.startswith("Yes")
    no = vqa_conversation(anomalous, rng, MASK, index=is_normal)
    assert no.answer.startswith("No") and "upper left" in no.answer and not no.has_seg and no.task == "vqa"
    assert "no defect" in vqa_conversation(normal, rng, index=0).answer.lower()
    assert vqa_conversation(normal, rng, index=5).answer == "A flat grey metal plate."
    assert vqa_conversation(anomalous, rng, MASK, index=5).answer == ANSWERS["description"]
    for c in (vqa_conversation(anomalous, rng, MASK, index=i) for i in range(len(VQA_QUESTIONS))):
        assert c.question.startswith(IMAGE_TOKEN + " ") and SEG_TOKEN not in c.answer


def test_vqa_answers_name_the_defect_and_its_facts() -> None:
    rng = np.random.default_rng(0)
    assert "blowhole" in vqa_conversation(_anomalous(), rng, MASK, index=0).answer
    assert (
        "missing piece" in vqa_conversation(_anomalous("synthetic_missing_piece"), rng, MASK, index=0).answer
    )
    where = vqa_conversation(_anomalous(), rng, MASK, index=1)
    assert where.question == "<image> Where is the defect located?" and "upper left" in where.answer
    two = MASK.copy()
    two[70:80, 70:80] = True
    assert "two" in vqa_conversation(_anomalous(), rng, two, index=3).answer
    size = vqa_conversation(_anomalous(), rng, MASK, index=4).answer
    assert "15 x 10 px" in size and "medium-sized" in size  # 150 px = 1.9 % of the image


def test_conversations_from_a_built_dataset(tiny_mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "riad"
    build_riad(tiny_mvtec, out)
    rng = np.random.default_rng(0)
    ratios = TaskRatios(seg=1, seg_answer=1, vqa=1)
    for sample in load_dataset(out).samples:
        for _ in range(6):
            c = build_conversation(sample, rng, ratios)  # masks are read from disk for VQA
            assert c.question.startswith("<image> ") and c.answer
            assert c.has_seg == (c.task != "vqa")
        kind = sample.defect_type.removeprefix("synthetic_").replace("_", " ")
        if sample.is_anomalous:
            assert kind in vqa_conversation(sample, rng, index=0).answer


def test_kind_question_names_the_kind_and_is_never_drawn_by_default() -> None:
    c = kind_conversation("metal_plate", "missing_piece")
    assert c.question == (
        "<image> Is there a missing piece on the metal plate? If so, please output its segmentation result."
    )
    assert c.answer == "It is <seg>." and c.has_seg and c.task == "seg_kind"
    rng = np.random.default_rng(0)
    assert "seg_kind" not in {choose_task(rng, TaskRatios()) for _ in range(500)}
    rng = np.random.default_rng(0)
    draws = Counter(choose_task(rng, TaskRatios(seg=1.0, seg_answer=0.0, vqa=0.0, seg_kind=3.0))
                    for _ in range(2000))
    assert abs(draws["seg_kind"] / 2000 - 0.75) < 0.04 and set(draws) == {"seg", "seg_kind"}
    with pytest.raises(ConfigError, match="seg_kind"):
        conversation_for("seg_kind", _normal(), rng)
