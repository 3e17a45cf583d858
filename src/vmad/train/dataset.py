"""Training examples: image, mask and one instruction conversation per sample (paper Sec. V-A.2).

Each item is drawn for a ``(epoch, index)`` pair: the task and question come from an RNG seeded by
``(seed, epoch, index)``, so the data a step sees depends only on the seed and the step, never on worker
processes or on where a run was resumed. The order is :class:`EpochBatches`: a seeded permutation per
epoch, padded by wrapping to a multiple of ``world_size * batch_size`` and dealt round-robin to the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vmad.data.io import read_image, read_mask
from vmad.data.prompts import IMAGE_TOKEN, SEG_TOKEN, TaskRatios, build_conversation
from vmad.data.records import Sample
from vmad.data.text import normal_description


def fallback_description(class_name: str) -> str:
    """Normal description of a class whose records carry none (OURS: the builder's first template)."""
    return normal_description(class_name, np.random.default_rng(0))


@dataclass
class TrainItem:
    image: Tensor  # [3, S, S] in [0, 1]
    mask: Tensor  # [S, S] in {0, 1}
    question: str
    answer: str
    has_seg: bool
    task: str
    class_name: str
    is_normal: bool
    normal_description: str


class InstructionDataset(Dataset):
    """Samples -> :class:`TrainItem` at ``image_size`` (square resize, OURS as the model's encoders do).

    ``seg_token`` replaces the prompts' ``<seg>`` when the model uses another spelling; the ``<image>``
    placeholder is removed from the question (the model's prompt layout places it).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        ratios: TaskRatios,
        seed: int = 0,
        seg_token: str = SEG_TOKEN,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.ratios = ratios
        self.seed = seed
        self.seg_token = seg_token

    def __len__(self) -> int:
        return len(self.samples)

    def class_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for s in self.samples:
            sizes[s.class_name] = sizes.get(s.class_name, 0) + 1
        return sizes

    def load_image(self, sample: Sample) -> Tensor:
        size = (self.image_size, self.image_size)
        im = Image.fromarray(read_image(sample.image_path)).resize(size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def __getitem__(self, key: int | tuple[int, int]) -> TrainItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        full_mask = read_mask(sample)
        rng = np.random.default_rng([self.seed, epoch + 1, index])  # epoch -1: DSSL prefill
        conv = build_conversation(sample, rng, self.ratios, mask=full_mask)
        small = full_mask
        if full_mask.shape != (self.image_size, self.image_size):
            small = read_mask(sample, (self.image_size, self.image_size))
        question = conv.question.replace(IMAGE_TOKEN, "").strip()
        answer = (
            conv.answer.replace(SEG_TOKEN, self.seg_token) if self.seg_token != SEG_TOKEN else conv.answer
        )
        return TrainItem(
            image=self.load_image(sample),
            mask=torch.from_numpy(small.astype(np.float32)),
            question=question,
            answer=answer,
            has_seg=conv.has_seg,
            task=conv.task,
            class_name=sample.class_name,
            is_normal=not sample.is_anomalous,
            normal_description=sample.normal_description or fallback_description(sample.class_name),
        )


def collate(items: Sequence[TrainItem]) -> dict[str, Any]:
    """Stack images / masks; lists for the text fields."""
    return {
        "images": torch.stack([it.image for it in items]),
        "masks": torch.stack([it.mask for it in items]),
        "questions": [it.question for it in items],
        "answers": [it.answer for it in items],
        "tasks": [it.task for it in items],
        "class_names": [it.class_name for it in items],
        "is_normal": torch.tensor([it.is_normal for it in items], dtype=torch.bool),
        "normal_descriptions": [it.normal_description for it in items],
    }


class EpochBatches:
    """This rank's batches of one epoch as lists of ``(epoch, index)`` keys, from batch ``start`` on."""

    def __init__(
        self, n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 1)
        order = torch.randperm(n, generator=g).tolist()
        chunk = world * batch_size
        total = -(-n // chunk) * chunk
        order = (order * (total // n + 1))[:total]  # wrap around so every rank gets full batches
        mine = order[rank::world]
        self.batches = [
            [(epoch, i) for i in mine[b : b + batch_size]] for b in range(0, len(mine), batch_size)
        ]
        self.start = start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches[self.start :])


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return -(-n // (world * batch_size))
