"""OURS, not in the paper: the zero-shot normality prior a ``prior_prompt`` model's mask decoder takes.

The prior of an image is MuSc's patch map (:mod:`vmad.baselines.musc`, no training) computed by mutual scoring
against the other images scored with it: the other images of the same folder or batch (``folder``), a few
normal images of the object given as references (``references``), or both pooled (``folder+references``).
A single image without references has no prior (``none``); the model then runs as without the option.

A folder may hold several kinds of object (OURS): mutual scoring across kinds gives meaningless priors (every
patch of a part unlike all others looks anomalous). The folder is first split into kinds, the connected
components of the graph joining two images whose global features (MuSc's pooled backbone feature) have cosine
similarity at least ``PriorConfig.kind_similarity`` (:func:`kinds_of`); each kind is scored on its own, and an
image unlike every other one gets no prior. With references every image is scored with them (the references
say what the object is).

Maps are put in standard units over each scored set: ``(map - median) / (1.4826 * MAD)``, so 0 is a
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
    #: OURS: folder images are split into kinds (:func:`kinds_of`) at this cosine similarity of their global
    #: features; None = the whole folder is one kind. 0.7 was chosen on the in-domain test splits, the
    #: held-out surfaces and photo crops built here (nearest same-kind neighbour at least 0.79 in every one of
    #: those sets; different kinds mostly below 0.6), not on MVTec AD.
    kind_similarity: float | None = 0.7

    def __post_init__(self) -> None:
        if self.kind_similarity is not None and not -1.0 <= self.kind_similarity <= 1.0:
            raise VMADError(f"PriorConfig.kind_similarity must be in [-1, 1] or None, got "
                            f"{self.kind_similarity}")


@dataclass
class Priors:
    """``maps[i]``: image i's prior (standard units, ``[h, w]`` float32) or None; ``mode``: one of
    :data:`PRIOR_MODES`; ``image_scores[i]``: MuSc's raw image score (map maximum) or NaN; ``kinds[i]``
    (folder mode): the kind image i was scored with, -1 when it was unlike every other image (no prior)."""

    maps: list[np.ndarray | None]
    mode: str
    image_scores: np.ndarray
    kinds: np.ndarray | None = None

    def subset(self, index: Sequence[int]) -> Priors:
        """The priors of images ``index`` (same mode)."""
        kinds = None if self.kinds is None else self.kinds[list(index)]
        return Priors([self.maps[i] for i in index], self.mode, self.image_scores[list(index)], kinds)

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


def kinds_of(global_feats: torch.Tensor, threshold: float) -> np.ndarray:
    """Kind label of each image: connected components of the graph joining images whose L2-normalised global
    features have cosine similarity >= ``threshold``; -1 for an image joined to no other."""
    f = F.normalize(global_feats.float().flatten(1), dim=1)
    linked = (f @ f.T >= threshold).numpy()
    n = len(linked)
    labels = np.full(n, -1)
    kind = 0
    for start in range(n):
        if labels[start] >= 0 or linked[start].sum() < 2:  # the diagonal always counts once
            continue
        labels[start], stack = kind, [start]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(linked[i] & (labels < 0)):
                labels[j] = kind
                stack.append(int(j))
        kind += 1
    return labels


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
    if use_folder and not refs and config.kind_similarity is not None:
        return _priors_by_kind(images, scorer, config)
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


def _priors_by_kind(images: Sequence[np.ndarray], scorer: MuScScorer, config: PriorConfig) -> Priors:
    """Folder mode: features once, then mutual scoring and standard units within each kind
    (:func:`kinds_of`); an image of no kind gets no prior."""
    levels, global_feats = scorer.features(images)
    kinds = kinds_of(global_feats, float(config.kind_similarity or 0.0))
    maps: list[np.ndarray | None] = [None] * len(images)
    scores = np.full(len(images), np.nan)
    for kind in range(int(kinds.max()) + 1):
        index = np.flatnonzero(kinds == kind)
        if len(index) < max(2, config.min_images):
            kinds[index] = -1
            continue
        rows = torch.from_numpy(index)
        out = scorer.score_features([level[rows] for level in levels], global_feats[rows])
        std = standardize(out.anomaly_maps)
        for k, i in enumerate(index):
            maps[i] = _own_frame(std[k], *np.asarray(images[i]).shape[:2], config.map_side)
        scores[index] = out.image_scores
    mode = "folder" if any(m is not None for m in maps) else "none"
    return Priors(maps, mode, scores, kinds)


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
