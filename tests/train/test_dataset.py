"""Training from any readable dataset: a plain folder is the train split, anomalous samples without text
answers fall back to the segmentation task (with a message), reader options reach the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vmad.data.dataset import data_options
from vmad.data.prompts import TaskRatios
from vmad.errors import ConfigError
from vmad.train.config import DataConfig
from vmad.train.dataset import InstructionDataset, load_training_samples


@pytest.fixture
def plain_folder(tmp_path: Path, data_factory) -> Path:
    """images/ + masks/ with MVTec-style mask names, no split folders: 2 anomalous, 2 normal."""
    root = tmp_path / "parts"
    for i in range(4):
        data_factory.write_image(root / "images" / f"p{i}.png", seed=i)
    for i in range(2):
        data_factory.write_mask(root / "masks" / f"p{i}_mask.png")
    return root


def _data(root: Path, mask_name: str) -> DataConfig:
    return DataConfig(root=str(root), options=data_options(mask_name))


def test_plain_folder_is_the_train_split_and_options_apply(plain_folder: Path) -> None:
    samples = load_training_samples(_data(plain_folder, "{stem}_mask.png"))
    assert len(samples) == 4 and {s.split for s in samples} == {"train"}
    assert sum(s.is_anomalous for s in samples) == 2
    # an explicit default_split is kept: then the train split is empty, and the error says what to set
    opts = data_options(None, ["folder.default_split=test", "folder.mask_name={stem}_mask.png"])
    with pytest.raises(ConfigError, match=r"no training samples for split 'train'.*data.split=null"):
        load_training_samples(DataConfig(root=str(plain_folder), options=opts))
    assert len(load_training_samples(DataConfig(root=str(plain_folder), options=opts, split=None))) == 4
    with pytest.raises(ConfigError, match="data.root is not set"):
        load_training_samples(DataConfig())


def test_samples_without_answers_train_the_segmentation_task_only(plain_folder: Path, capsys) -> None:
    samples = load_training_samples(_data(plain_folder, "{stem}_mask.png"))
    ds = InstructionDataset(samples, 32, TaskRatios(seg=0.0, seg_answer=1.0, vqa=1.0), seed=3)
    err = capsys.readouterr().err
    assert "2 of 2 anomalous training samples have no text answers" in err and "build-riad" in err
    tasks = {(i, e): ds[(e, i)].task for i in range(4) for e in range(5)}
    for (i, _), task in tasks.items():
        if samples[i].is_anomalous:
            assert task == "seg"  # never a task needing an answer the data does not have
        else:
            assert task in ("seg_answer", "vqa")  # normal samples keep the "no defect" answers
    item = ds[(0, 0)]
    assert item.has_seg and item.answer == "It is <seg>." and item.mask.sum() > 0
    quiet = InstructionDataset(samples[2:], 32, TaskRatios(), announce=True)
    assert not quiet.seg_only and quiet.fallback_message() == ""


def test_referring_examples_mask_only_the_asked_kind(plain_folder: Path) -> None:
    """seg_kind (OURS): a normal image gets one or two synthetic kinds painted and the question names one;
    the mask is that kind's pixels (changed pixels of the image), empty for a kind the image lacks; the same
    key gives the same example; anomalous samples without a synthetic kind fall back to the plain question."""
    samples = load_training_samples(_data(plain_folder, "{stem}_mask.png"))
    ds = InstructionDataset(samples, 48, TaskRatios(seg=0.0, seg_answer=0.0, vqa=0.0, seg_kind=1.0),
                            seed=1, announce=False)
    normal = next(i for i, s in enumerate(samples) if not s.is_anomalous)
    original = ds.load_image(samples[normal])
    seen_empty = seen_kind = False
    for epoch in range(12):
        item = ds[(epoch, normal)]
        assert item.task == "seg_kind" and item.has_seg and item.answer == "It is <seg>."
        assert item.question.startswith("Is there a ") and "segmentation result" in item.question
        changed = (item.image - original).abs().amax(dim=0) > 0
        assert changed.any()  # a kind was painted
        assert not (item.mask.bool() & ~changed).any()  # the mask lies on painted pixels only
        assert not item.is_normal  # a painted image is never a normal one (DSSL), whatever is asked
        if item.mask.any():
            seen_kind = True
        else:
            seen_empty = True
        again = ds[(epoch, normal)]
        assert torch.equal(again.image, item.image) and torch.equal(again.mask, item.mask)
    assert seen_kind and seen_empty
    anomalous = next(i for i, s in enumerate(samples) if s.is_anomalous)
    assert ds[(0, anomalous)].task == "seg"  # its defect's kind is unknown


def test_kind_example_pair_masks_are_disjoint_and_follow_the_asked_kind() -> None:
    from vmad.data.synth import SYNTHETIC_KINDS
    from vmad.train.dataset import kind_example

    base = np.random.default_rng(0).integers(90, 160, (64, 64, 3), dtype=np.uint8)
    asked_present = 0
    for seed in range(20):
        empty = np.zeros((64, 64), bool)
        image, mask, kind = kind_example(base.copy(), empty, None, np.random.default_rng(seed))
        assert kind in SYNTHETIC_KINDS and image.shape == base.shape and mask.dtype == bool
        changed = (image != base).any(axis=2)
        assert not (mask & ~changed).any()
        asked_present += bool(mask.any())
    assert 8 <= asked_present < 20  # most questions name a painted kind, some an absent one
    held = np.zeros((64, 64), bool)
    held[10:20, 10:20] = True
    kinds = set()
    for seed in range(30):
        _, mask, kind = kind_example(base.copy(), held, "spot", np.random.default_rng(seed))
        kinds.add(kind)
        assert (mask == held).all() if kind == "spot" else not mask.any()
    assert "spot" in kinds and len(kinds) > 1
