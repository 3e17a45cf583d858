"""Training-time normality priors (vmad.train.priors) and their way into the batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vmad.baselines.prior import Priors
from vmad.data.prompts import TaskRatios
from vmad.data.records import Sample
from vmad.train import priors as train_priors
from vmad.train.dataset import InstructionDataset, collate
from vmad_testing import write_riad


def samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/d/{c}/{i}.png"), c, 0, "good", "train")
            for c, n in counts.items() for i in range(n)]


def plate_samples(data: Path) -> list[Sample]:
    return [Sample(p, "plate", 0, "good", "train") for p in sorted((data / "plate" / "images").glob("*.png"))]


def test_groups_hold_one_class_and_absorb_small_remainders() -> None:
    items = samples({"a": 10, "b": 9, "c": 1})
    groups = train_priors.class_groups(items, group_size=4, seed=0)
    for g in groups:
        assert len({items[i].class_name for i in g}) == 1
    assert sorted(i for g in groups for i in g) == list(range(20))
    sizes = sorted(len(g) for g in groups if items[g[0]].class_name == "b")
    assert sizes == [4, 5]  # 4 + 4 + 1: the 1 joins the previous group
    assert train_priors.class_groups(items, 4, seed=0) == groups  # seeded


def test_priors_are_computed_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_riad(tmp_path / "riad", classes=("plate",), per_class=4)
    items = plate_samples(data)
    calls = []

    def fake(images, config=None):
        calls.append(len(images))
        return Priors([np.full((4, 5), float(k), np.float32) for k in range(len(images))], "folder",
                      np.zeros(len(images)))

    monkeypatch.setattr(train_priors, "compute_priors", fake)
    first = train_priors.training_priors(items, tmp_path / "run", group_size=8, seed=0, verbose=False)
    assert calls == [4] and (tmp_path / "run" / train_priors.PRIORS_FILE).is_file()
    again = train_priors.training_priors(items, tmp_path / "run", group_size=8, seed=0, verbose=False)
    assert calls == [4]  # read back, not recomputed
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)


def test_dataset_items_carry_priors_with_dropout(tmp_path: Path) -> None:
    data = write_riad(tmp_path / "riad", classes=("plate",), per_class=2)
    items = plate_samples(data)
    maps = {str(items[0].image_path): np.arange(20, dtype=np.float32).reshape(4, 5)}
    ratios = TaskRatios(1.0, 0.0, 0.0)
    ds = InstructionDataset(items, 16, ratios, priors=maps, prior_dropout=0.0)
    first, second = ds[0], ds[1]
    assert first.prior.shape == (1, 16, 16) and float(first.prior.max()) > 15  # stretched like the image
    assert bool(torch.isnan(second.prior).all())  # no map: "no prior"
    batch = collate([first, second])
    assert batch["priors"].shape == (2, 1, 16, 16)
    dropped = InstructionDataset(items, 16, ratios, priors=maps, prior_dropout=1.0)[0]
    assert bool(torch.isnan(dropped.prior).all())
    assert "priors" not in collate([InstructionDataset(items, 16, ratios)[0]])


def test_tiny_training_with_the_prior_prompt(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vmad.train.config import load_train_config
    from vmad.train.trainer import train
    from vmad_testing import TINY_CONFIG, tiny_overrides

    data = write_riad(tmp_path / "riad", classes=("plate",), per_class=6)
    extra = {"model.mask_decoder.prior_prompt": "true", "train.dssl": "false", "data.prior_group_size": 6,
             "data.prior_dropout": 0.0, "data.tasks.seg_answer": 0.0, "data.tasks.vqa": 0.0}
    cfg = load_train_config(TINY_CONFIG, tiny_overrides(data, tmp_path / "run", 2, **extra))
    train(cfg)
    cached = load_file(str(tmp_path / "run" / train_priors.PRIORS_FILE))
    assert len(cached) == 6  # one prior per training image
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert "mask_decoder.prior_prompt.skip_weight" in final
    assert float(final["mask_decoder.prior_prompt.skip_weight"].abs()) > 0  # trained: it moved from 0
