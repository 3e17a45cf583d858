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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vmad.baselines.musc import MuScConfig, MuScScorer, lnamd
from vmad.errors import VMADError

PRIOR_MODES = ("none", "folder", "references", "folder+references", "self")


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
    #: OURS: an image with nothing to be compared with (alone, no references, or unlike every other image of
    #: its folder) gets a prior from its own patches (:func:`self_scores`) when True; False (default) = none.
    self_prior: bool = False
    #: self prior: patches within this many grid cells (Chebyshev) of a patch are not compared with it, and
    #: a patch's score is the mean distance to its ``self_fraction`` most similar other patches.
    self_exclusion: int = 2
    self_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind_similarity is not None and not -1.0 <= self.kind_similarity <= 1.0:
            raise VMADError(f"PriorConfig.kind_similarity must be in [-1, 1] or None, got "
                            f"{self.kind_similarity}")
        if self.self_exclusion < 0 or not 0.0 <= self.self_fraction <= 0.5:
            raise VMADError(f"PriorConfig: self_exclusion must be >= 0 and self_fraction in [0, 0.5], got "
                            f"{self.self_exclusion}, {self.self_fraction}")


@dataclass
class Priors:
    """``maps[i]``: image i's prior (standard units, ``[h, w]`` float32) or None; ``mode``: one of
    :data:`PRIOR_MODES` (the set's: ``folder`` when some image has a folder prior); ``image_scores[i]``:
    MuSc's raw image score (map maximum) or NaN; ``kinds[i]`` (folder mode): the kind image i was scored with,
    -1 when it was unlike every other image; ``image_modes[i]``: image i's own mode where they differ (images
    with a self prior beside folder ones), None = ``mode`` for every image with a map."""

    maps: list[np.ndarray | None]
    mode: str
    image_scores: np.ndarray
    kinds: np.ndarray | None = None
    image_modes: list[str] | None = None

    def mode_of(self, i: int) -> str:
        """Image i's prior mode (``none`` when it has no map)."""
        if self.maps[i] is None:
            return "none"
        return self.image_modes[i] if self.image_modes is not None else self.mode

    def subset(self, index: Sequence[int]) -> Priors:
        """The priors of images ``index`` (same mode)."""
        kinds = None if self.kinds is None else self.kinds[list(index)]
        modes = None if self.image_modes is None else [self.image_modes[i] for i in index]
        return Priors([self.maps[i] for i in index], self.mode, self.image_scores[list(index)], kinds, modes)

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


def join_priors(parts: Sequence[Priors]) -> Priors:
    """The priors of several sets, one after another (each image keeps its own mode)."""
    maps = [m for p in parts for m in p.maps]
    known = bool(parts) and all(p.kinds is not None for p in parts)
    kinds = np.concatenate([p.kinds for p in parts]) if known else None  # type: ignore[misc]
    modes = [p.mode_of(i) for p in parts for i in range(len(p.maps))]
    mode = next((m for m in modes if m != "none"), "none")
    scores = np.concatenate([p.image_scores for p in parts]) if parts else np.zeros(0)
    return Priors(maps, mode, scores, kinds, modes)


def standardize(maps: np.ndarray) -> np.ndarray:
    """``(maps - median) / (1.4826 * MAD)`` over every value of ``maps`` (the whole scored set)."""
    values = maps.astype(np.float64).ravel()
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826
    return ((maps - median) / max(mad, 1e-6)).astype(np.float32)


def kinds_of(global_feats: torch.Tensor, threshold: float) -> np.ndarray:
    """Kind label of each image: connected components of the graph joining images whose L2-normalised global
    features have cosine similarity >= ``threshold``; -1 for an image joined to no other."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    f = F.normalize(global_feats.float().flatten(1), dim=1)
    linked = (f @ f.T >= threshold).numpy()
    np.fill_diagonal(linked, False)
    _, components = connected_components(csr_matrix(linked), directed=False)
    alone = ~linked.any(axis=1)
    labels = np.full(len(linked), -1)
    # kinds numbered 0, 1, ... in the order of their first image, as before
    for kind, component in enumerate(dict.fromkeys(components[~alone].tolist())):
        labels[components == component] = kind
    return labels


def self_scores(
    scorer: MuScScorer, levels: list[torch.Tensor], exclusion: int, fraction: float
) -> np.ndarray:
    """OURS: patch scores of each image against its own patches, ``(N, S, S)`` at MuSc's map size.

    On MuSc's LNAMD patch features (every level and degree, averaged as MuSc does), the score of patch p is
    the mean distance to its ``fraction`` x P nearest patches (at least one) among those more than
    ``exclusion`` grid cells away. A defect smaller than that fraction of the image finds no match in the rest
    of the image; a repeated texture or part does."""
    h, w = scorer.grid
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = ((yy[:, None] - yy[None]).abs() <= exclusion) & ((xx[:, None] - xx[None]).abs() <= exclusion)
    k = min(max(1, int(fraction * h * w)), int((~near).sum(dim=1).min()))
    if k < 1:
        raise VMADError(f"self prior: some patch has no other patch more than {exclusion} grid cells away on "
                        f"the {h} x {w} grid (PriorConfig.self_exclusion too large)")
    c, total = scorer.config, torch.zeros(levels[0].shape[0], h * w)
    for r in c.degrees:
        for z in lnamd(levels, r, (h, w)):
            d = torch.cdist(z, z).masked_fill_(near, math.inf)
            total += torch.topk(d, k, dim=-1, largest=False).values.mean(dim=-1)
    maps = (total / (len(c.degrees) * len(levels))).view(-1, 1, h, w)
    size = c.map_size or c.image_size
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)[:, 0].numpy()


def _own_frame(square: np.ndarray, image: np.ndarray, side: int) -> np.ndarray:
    """A map over MuSc's square input -> over ``image``'s own frame, longest side ``side``."""
    height, width = np.asarray(image).shape[:2]
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
    if mode == "none":
        if not config.self_prior:
            return Priors([None] * n, "none", np.full(n, np.nan))
        scorer = scorer or MuScScorer(config.musc)
        maps, scores = _self_priors(images, scorer.features(images)[0], scorer, config)
        return Priors(list(maps), "self", scores)
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
    maps = [_own_frame(std[i], images[i], config.map_side) for i in range(n)]
    return Priors(list(maps), mode, np.asarray(scores, dtype=np.float64))


def _priors_by_kind(images: Sequence[np.ndarray], scorer: MuScScorer, config: PriorConfig) -> Priors:
    """Folder mode: features once, then mutual scoring and standard units within each kind
    (:func:`kinds_of`); an image of no kind gets a self prior (``config.self_prior``) or none."""
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
            maps[i] = _own_frame(std[k], images[i], config.map_side)
        scores[index] = out.image_scores
    modes = ["folder" if m is not None else "none" for m in maps]
    alone = np.flatnonzero(kinds < 0)
    if config.self_prior and len(alone):
        rows = torch.from_numpy(alone)
        own, own_scores = _self_priors([images[i] for i in alone], [lv[rows] for lv in levels], scorer,
                                       config)
        for k, i in enumerate(alone):
            maps[i], scores[i], modes[i] = own[k], own_scores[k], "self"
    mode = "folder" if "folder" in modes else "self" if "self" in modes else "none"
    return Priors(maps, mode, scores, kinds, modes)


def _self_priors(
    images: Sequence[np.ndarray], levels: list[torch.Tensor], scorer: MuScScorer, config: PriorConfig
) -> tuple[list[np.ndarray], np.ndarray]:
    """Self priors (:func:`self_scores`) of ``images``, each in standard units over its own map."""
    raw = self_scores(scorer, levels, config.self_exclusion, config.self_fraction)
    maps = [_own_frame(standardize(raw[k]), im, config.map_side) for k, im in enumerate(images)]
    return maps, raw.reshape(len(raw), -1).max(axis=1).astype(np.float64)


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
