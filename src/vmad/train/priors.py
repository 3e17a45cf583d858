"""Normality priors of the training images, for a model with ``mask_decoder.prior_prompt`` (OURS).

At inference a prior comes from mutual scoring over the folder being inspected (:mod:`vmad.baselines.prior`).
For training, each class's images are shuffled (seeded) and cut into groups of about ``group_size`` (folders
of the size a user inspects) and each group is scored together, so the training priors are made the way test
priors are. The maps are computed once, before the first step, and cached in
``<output_dir>/priors.safetensors`` (written atomically; a resumed run reads it back).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vmad.atomic import atomic_path
from vmad.baselines.prior import PriorConfig, compute_priors
from vmad.data.io import read_image
from vmad.data.records import Sample

PRIORS_FILE = "priors.safetensors"


def prior_key(sample: Sample) -> str:
    return str(sample.image_path)


def class_groups(samples: Sequence[Sample], group_size: int, seed: int) -> list[list[int]]:
    """Indices of ``samples`` in groups of one class, ``group_size`` at most and at least half of it where
    the class allows (a small remainder joins the previous group)."""
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.class_name, []).append(i)
    rng = np.random.default_rng(seed)
    groups: list[list[int]] = []
    for name in sorted(by_class):
        idx = [by_class[name][j] for j in rng.permutation(len(by_class[name]))]
        chunks = [idx[k : k + group_size] for k in range(0, len(idx), group_size)]
        if len(chunks) > 1 and len(chunks[-1]) < group_size // 2:
            chunks[-2].extend(chunks.pop())
        groups.extend(chunks)
    return groups


def training_priors(
    samples: Sequence[Sample], out_dir: Path, group_size: int, seed: int, verbose: bool = True
) -> dict[str, np.ndarray]:
    """``{prior_key(sample): map}`` for every sample in a group of at least two images, from the cache when
    it holds every key, else computed and cached."""
    from safetensors.numpy import load_file, save_file

    cache = Path(out_dir) / PRIORS_FILE
    keys = [prior_key(s) for s in samples]
    if cache.is_file():
        cached = load_file(str(cache))
        if all(k in cached for k in keys):
            return {k: cached[k].astype(np.float32) for k in keys}
    groups = class_groups(samples, group_size, seed)
    maps: dict[str, np.ndarray] = {}
    config = PriorConfig(kind_similarity=None)  # a group is one class: never split into kinds
    for g, idx in enumerate(groups):
        if verbose:
            print(f"priors: group {g + 1}/{len(groups)} ({samples[idx[0]].class_name}, {len(idx)} images)",
                  file=sys.stderr)
        priors = compute_priors([read_image(samples[i].image_path) for i in idx], config=config)
        for i, m in zip(idx, priors.maps, strict=True):
            if m is not None:
                maps[keys[i]] = m
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({k: v.astype(np.float16) for k, v in maps.items()}, str(tmp))
    return maps
