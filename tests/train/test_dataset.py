"""Training from any readable dataset: a plain folder is the train split, anomalous samples without text
answers fall back to the segmentation task (with a message), reader options reach the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

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
