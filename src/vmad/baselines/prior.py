"""OURS, not in the paper: the zero-shot normality prior a ``prior_prompt`` model's mask decoder takes.

The prior of an image is MuSc's patch map (:mod:`vmad.baselines.musc`, no training) computed by mutual scoring
against the other images scored with it: the other images of the same folder or batch (``folder``), a few
normal images of the object given as references (``references``), or both pooled (``folder+references``).
A single image without references has no prior (``none``); the model then runs as without the option.

Maps are put in standard units over the whole scored set: ``(map - median) / (1.4826 * MAD)``, so 0 is a
typical patch and a defect patch stands several units above, whatever the object and the backbone's scale
(:func:`standardize`). Maps are returned over each image's own frame (MuSc's square input is a stretch of the
image), longest side ``map_side``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vmad.baselines.musc import MuScConfig, MuScScorer
from vmad.errors import VMADError

PRIOR_MODES = ("none", "folder", "references", "folder+references")


@dataclass
class PriorConfig:
    """How priors are computed: MuSc's settings (RsCIN off: only the maps are used; a folder of more than 200
    images is scored in interleaved groups of at most 200, ``MuScConfig.group_size``), the map size, and the
    smallest set mutual scoring is run on (fewer images than ``min_images``: no prior)."""

    musc: MuScConfig = field(default_factory=lambda: MuScConfig(rscin_k=(), map_size=64, group_size=200))
    map_side: int = 128
    min_images: int = 2


@dataclass
class Priors:
    """``maps[i]``: image i's prior (standard units, ``[h, w]`` float32) or None; ``mode``: one of
    :data:`PRIOR_MODES`; ``image_scores[i]``: MuSc's raw image score (map maximum) or NaN."""

    maps: list[np.ndarray | None]
    mode: str
    image_scores: np.ndarray

    def subset(self, index: Sequence[int]) -> Priors:
        """The priors of images ``index`` (same mode)."""
        return Priors([self.maps[i] for i in index], self.mode, self.image_scores[list(index)])

    def tensor(self, index: Sequence[int] | None = None) -> torch.Tensor | None:
        """The maps of ``index`` (default all) as one ``[K, 1, h, w]`` tensor for
        :meth:`vmad.model.vmad.VMADModel.encode_images` (all-NaN rows where an image has none; maps resized to
        the first one's size), or None when no image has a prior."""
        rows = [self.maps[i] for i in (index if index is not None else range(len(self.maps)))]
        present = [m for m in rows if m is not None]
        if not present:
            return None
        size = present[0].shape
        out = torch.full((len(rows), 1, *size), float("nan"))
        for k, m in enumerate(rows):
            if m is not None:
                t = torch.from_numpy(m)[None, None]
                out[k] = t[0] if t.shape[-2:] == size else F.interpolate(t, size=size, mode="bilinear")[0]
        return out


def standardize(maps: np.ndarray) -> np.ndarray:
    """``(maps - median) / (1.4826 * MAD)`` over every value of ``maps`` (the whole scored set)."""
    values = maps.astype(np.float64).ravel()
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826
    return ((maps - median) / max(mad, 1e-6)).astype(np.float32)


def _own_frame(square: np.ndarray, height: int, width: int, side: int) -> np.ndarray:
    scale = side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    t = torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def compute_priors(
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray] = (),
    use_folder: bool = True,
    config: PriorConfig | None = None,
    scorer: MuScScorer | None = None,
) -> Priors:
    """Priors for ``images`` (``(H, W[, 3])`` uint8 arrays) by mutual scoring over the images themselves
    (``use_folder``) and/or ``references`` (normal images of the same object; never given a prior
    themselves). With ``use_folder`` False each image is scored against the references only."""
    config = config or PriorConfig()
    n, refs = len(images), list(references)
    mode = _mode(n, len(refs), use_folder, config.min_images)
    empty = Priors([None] * n, "none", np.full(n, np.nan))
    if mode == "none":
        return empty
    scorer = scorer or MuScScorer(config.musc)
    if use_folder:
        out = scorer.score([*images, *refs], "prior")
        raw, scores = out.anomaly_maps, out.image_scores[:n]
    else:  # each image against the references alone: one mutual scoring per image
        raw_list, score_list = [], []
        for image in images:
            out = scorer.score([image, *refs], "prior")
            raw_list.append(out.anomaly_maps[:1])
            score_list.append(out.image_scores[0])
        raw = np.concatenate([*raw_list, scorer.score(refs, "prior").anomaly_maps]) if len(refs) > 1 else (
            np.concatenate(raw_list)
        )
        scores = np.asarray(score_list)
    std = standardize(raw)
    maps = [_own_frame(std[i], *np.asarray(images[i]).shape[:2], config.map_side) for i in range(n)]
    return Priors(list(maps), mode, np.asarray(scores, dtype=np.float64))


def _mode(n: int, n_refs: int, use_folder: bool, min_images: int) -> str:
    if n == 0:
        raise VMADError("no images to compute normality priors for")
    folder = use_folder and n >= 2
    pooled = (n if use_folder else 1) + n_refs
    if pooled < max(2, min_images):
        return "none"
    if folder and n_refs:
        return "folder+references"
    return "folder" if folder else "references" if n_refs else "none"
