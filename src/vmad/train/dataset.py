"""Training examples: image, mask and one instruction conversation per sample (paper Sec. V-A.2).

Each item is drawn for a ``(epoch, index)`` pair: the task and question come from an RNG seeded by
``(seed, epoch, index)``, so the data a step sees depends only on the seed and the step, never on worker
processes or on where a run was resumed. The order is :class:`EpochBatches`: a seeded permutation per
epoch, padded by wrapping to a multiple of ``world_size * batch_size`` and dealt round-robin to the ranks.

Any dataset the readers read can be trained on (OURS): :func:`load_training_samples` reads a plain folder
(no split folders) as the train split, and an anomalous sample without text answers (every format but RIAD
has none) is trained on the segmentation task only, with a message saying how many (normal samples get the
"no defect" answers). ``vmad data build-riad`` writes templated answers for all three tasks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vmad.data.io import read_image, read_mask
from vmad.data.prompts import (
    IMAGE_TOKEN,
    SEG_TOKEN,
    Conversation,
    TaskRatios,
    choose_task,
    conversation_for,
    kind_conversation,
)
from vmad.data.records import Sample
from vmad.data.synth import SYNTHETIC_KINDS, synthesize_kinds
from vmad.data.text import SYNTHETIC_PREFIX, normal_description
from vmad.errors import ConfigError

if TYPE_CHECKING:
    from vmad.train.config import DataConfig

#: The task mix of an anomalous sample without text answers: segmentation only.
SEG_ONLY = TaskRatios(seg=1.0, seg_answer=0.0, vqa=0.0)
#: Referring examples (OURS, task ``seg_kind``): share of painted normal images with two kinds (else one) and
#: share of questions about a kind the image holds (else about one it does not: an empty mask).
KIND_PAIR_SHARE = 0.8
KIND_PRESENT_SHARE = 0.75


def synthetic_kind(sample: Sample) -> str | None:
    """The kind of a RIAD image with one synthetic defect (``synthetic_spot`` -> ``spot``), else None."""
    kind = sample.defect_type.removeprefix(SYNTHETIC_PREFIX)
    return kind if sample.is_anomalous and kind != sample.defect_type and kind in SYNTHETIC_KINDS else None


def kind_example(
    image: np.ndarray, mask: np.ndarray, held: str | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str]:
    """A referring example (OURS): ``(image, mask of the asked kind, asked kind)``. A normal image (``held``
    None) gets two distinct synthetic kinds painted (one with probability 1 - ``KIND_PAIR_SHARE``); an image
    whose one defect is of kind ``held`` is kept. The asked kind is one the image holds with probability
    ``KIND_PRESENT_SHARE`` (mask: its pixels, less those a later kind painted over), else another (empty)."""
    if held is None:
        n = 2 if rng.random() < KIND_PAIR_SHARE else 1
        kinds = [SYNTHETIC_KINDS[i] for i in rng.permutation(len(SYNTHETIC_KINDS))[:n]]
        image, masks = synthesize_kinds(image, rng, kinds)
    else:
        kinds, masks = [held], [mask.astype(bool)]
    if rng.random() < KIND_PRESENT_SHARE:
        i = int(rng.integers(len(kinds)))
        return image, masks[i], kinds[i]
    absent = [k for k in SYNTHETIC_KINDS if k not in kinds]
    return image, np.zeros(image.shape[:2], dtype=bool), absent[int(rng.integers(len(absent)))]


def load_training_samples(data: DataConfig) -> list[Sample]:
    """The samples ``data`` selects: ``data.root`` read with ``data.options`` (a folder-format dataset
    without split folders as the train split unless ``options.folder.default_split`` is set), then
    ``data.split`` and ``data.classes``; ConfigError saying what to set when nothing is left."""
    from vmad.data import load_dataset

    if not data.root:
        raise ConfigError("data.root is not set (e.g. --set data.root=PATH)")
    options = data.options
    if options.folder.default_split is None:
        options = replace(options, folder=replace(options.folder, default_split="train"))
    ds = load_dataset(data.root, data.format, options)
    split = data.split
    samples = list(ds.samples) if split is None else (ds.select(split=split) if split in ds.splits() else [])
    if data.classes is not None:
        unknown = sorted(set(data.classes) - set(ds.class_names()))
        if unknown:
            raise ConfigError(f"data.classes: {unknown} not in {ds.class_names()}")
        samples = [s for s in samples if s.class_name in set(data.classes)]
    if not samples:
        hint = "; train on another split with --set data.split=NAME, or on all with --set data.split=null"
        raise ConfigError(
            f"{data.root}: no training samples for split {data.split!r} (splits: {ds.splits()}){hint}"
        )
    return samples


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
    prior: Tensor | None = None  # [1, S, S] normality prior (OURS, prior_prompt models), all NaN: none


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
        priors: Mapping[str, np.ndarray] | None = None,
        prior_dropout: float = 0.0,
        announce: bool = True,
    ) -> None:
        self.samples = list(samples)
        # anomalous samples without text answers: segmentation task only (module docstring)
        self.seg_only = frozenset(i for i, x in enumerate(self.samples) if x.is_anomalous and not x.answers)
        if self.seg_only and announce:
            print(self.fallback_message(), file=sys.stderr)
        self.priors = priors
        self.prior_dropout = prior_dropout
        self.image_size = image_size
        self.ratios = ratios
        # segmentation only (with the referring task when asked: it needs no text answers)
        self.seg_only_ratios = TaskRatios(SEG_ONLY.seg, 0.0, 0.0, ratios.seg_kind)
        self.seed = seed
        self.seg_token = seg_token

    def __len__(self) -> int:
        return len(self.samples)

    def fallback_message(self) -> str:
        """What happens to the anomalous samples without text answers (empty when there are none)."""
        if not self.seg_only:
            return ""
        n_anomalous = sum(x.is_anomalous for x in self.samples)
        return (
            f"note: {len(self.seg_only)} of {n_anomalous} anomalous training samples have no text answers "
            "(only RIAD data has them): they are trained on the segmentation task only; `vmad data "
            "build-riad --from DIR` writes templated answers for all three tasks"
        )

    def class_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for s in self.samples:
            sizes[s.class_name] = sizes.get(s.class_name, 0) + 1
        return sizes

    def load_pixels(self, sample: Sample) -> np.ndarray:
        """The sample's image at ``image_size`` (square, bilinear), (S, S, 3) uint8."""
        size = (self.image_size, self.image_size)
        image = Image.fromarray(read_image(sample.image_path))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR))

    def load_image(self, sample: Sample) -> Tensor:
        return _to_tensor(self.load_pixels(sample))

    def load_prior(self, sample: Sample, rng: np.random.Generator) -> Tensor | None:
        """The sample's prior stretched to ``image_size`` as the image is, or all NaN when it has none or
        the draw drops it (``prior_dropout``: the model also learns to work without); None without priors."""
        if self.priors is None:
            return None
        size = (self.image_size, self.image_size)
        prior = self.priors.get(str(sample.image_path))
        if prior is None or rng.random() < self.prior_dropout:
            return torch.full((1, *size), float("nan"))
        t = torch.from_numpy(np.asarray(prior, dtype=np.float32))[None, None]
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]

    def __getitem__(self, key: int | tuple[int, int]) -> TrainItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        full_mask = read_mask(sample)
        rng = np.random.default_rng([self.seed, epoch + 1, index])  # epoch -1: DSSL prefill
        task = choose_task(rng, self.seg_only_ratios if index in self.seg_only else self.ratios)
        held = synthetic_kind(sample)
        if task == "seg_kind" and (held is not None or not sample.is_anomalous):
            return self._kind_item(sample, full_mask, held, rng)
        conv = conversation_for("seg" if task == "seg_kind" else task, sample, rng, mask=full_mask)
        small = full_mask
        if full_mask.shape != (self.image_size, self.image_size):
            small = read_mask(sample, (self.image_size, self.image_size))
        return self._item(sample, self.load_image(sample), small, conv, self.load_prior(
            sample, np.random.default_rng([self.seed, epoch + 1, index, 1])))

    def _kind_item(
        self, sample: Sample, full_mask: np.ndarray, held: str | None, rng: np.random.Generator
    ) -> TrainItem:
        """Referring segmentation (OURS, module ``kind_example``); no prior (the painted image has none)."""
        size = (self.image_size, self.image_size)
        mask = full_mask if full_mask.shape == size else read_mask(sample, size)
        image, target, kind = kind_example(self.load_pixels(sample), mask > 0, held, rng)
        prior = None if self.priors is None else torch.full((1, *size), float("nan"))
        conv = kind_conversation(sample.class_name, kind)
        item = self._item(sample, _to_tensor(image), target, conv, prior)
        item.is_normal = False  # the image holds a defect even when the asked kind is absent (DSSL positives)
        return item

    def _item(self, sample: Sample, image: Tensor, mask: np.ndarray, conv: Conversation,
              prior: Tensor | None) -> TrainItem:
        question = conv.question.replace(IMAGE_TOKEN, "").strip()
        answer = (
            conv.answer.replace(SEG_TOKEN, self.seg_token) if self.seg_token != SEG_TOKEN else conv.answer
        )
        return TrainItem(
            image=image,
            mask=torch.from_numpy(mask.astype(np.float32)),
            question=question,
            answer=answer,
            has_seg=conv.has_seg,
            task=conv.task,
            class_name=sample.class_name,
            is_normal=not sample.is_anomalous,
            normal_description=sample.normal_description or fallback_description(sample.class_name),
            prior=prior,
        )


def _to_tensor(pixels: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def collate(items: Sequence[TrainItem]) -> dict[str, Any]:
    """Stack images / masks (and priors when the items carry them); lists for the text fields."""
    priors = [it.prior for it in items]
    extra = {"priors": torch.stack(priors)} if all(p is not None for p in priors) else {}
    return {
        **extra,
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
