"""Zero-shot normality priors (vmad.baselines.prior) with a hand-made feature function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vmad.baselines.musc import MuScConfig, MuScScorer
from vmad.baselines.prior import PriorConfig, compute_priors, join_priors, kinds_of, self_scores, standardize
from vmad.errors import VMADError


def pixel_features(images):
    """Levels = the images themselves at 1/8 resolution (a defect is a patch unlike the others)."""
    x = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1)
                     for i in images])
    x = F.interpolate(x, size=(8, 8), mode="area")
    return [x], x.mean(dim=(2, 3))


def scorer() -> MuScScorer:
    return MuScScorer(MuScConfig(image_size=64, grid_stride=8, degrees=(1,), rscin_k=(), map_size=16),
                      features=pixel_features)


def images(n: int, defect: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.linspace(60, 200, 64), np.linspace(40, 160, 48))
    ramp = np.stack([xs, ys, np.full((48, 64), 120.0)], -1)
    out = [(ramp + rng.integers(-2, 3, (48, 64, 3))).astype(np.uint8) for _ in range(n)]  # the same part
    if defect is not None:
        out[defect][6:18, 40:56] = (250, 30, 30)  # a red stain: unlike every grey patch
    return out


def test_standardize_centres_and_scales() -> None:
    values = np.random.default_rng(0).normal(5.0, 2.0, (40, 16, 16)).astype(np.float32)
    z = standardize(values)
    assert abs(float(np.median(z))) < 1e-5
    assert abs(float(np.median(np.abs(z))) * 1.4826 - 1.0) < 1e-3


def test_folder_prior_marks_the_defect_in_its_own_frame() -> None:
    pr = compute_priors(images(6, defect=2), config=PriorConfig(map_side=32), scorer=scorer())
    assert pr.mode == "folder"
    m = pr.maps[2]
    assert m.shape == (24, 32)  # longest side 32, the image's aspect
    assert m[3:9, 20:28].mean() > 3 * float(np.abs(m[15:, :12]).max())  # the stain stands out
    assert max(float(pr.maps[i].max()) for i in (0, 1, 3)) < float(m.max()) / 3
    assert int(np.argmax(pr.image_scores)) == 2
    stacked = pr.tensor([2, 0])
    assert stacked.shape == (2, 1, 24, 32) and torch.equal(stacked[0, 0], torch.from_numpy(m))


def test_modes_and_missing_priors() -> None:
    s = scorer()
    assert compute_priors(images(1), scorer=s).mode == "none"  # the self prior is off by default
    assert compute_priors(images(1), scorer=s).tensor() is None
    one = compute_priors(images(1, defect=0), references=images(5), config=PriorConfig(map_side=32), scorer=s)
    y, x = np.unravel_index(int(np.argmax(one.maps[0])), one.maps[0].shape)
    assert one.mode == "references" and 2 <= y <= 10 and 19 <= x <= 29  # the peak is on the stain
    assert compute_priors(images(3), references=images(2), scorer=s).mode == "folder+references"
    refs_only = compute_priors(images(2, defect=1), references=images(3), use_folder=False, scorer=s)
    assert refs_only.mode == "references" and float(refs_only.maps[1].max()) > float(refs_only.maps[0].max())
    with pytest.raises(VMADError, match="no images"):
        compute_priors([], scorer=s)


def test_kinds_are_connected_components_of_similar_images() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0], [0.8, 0.3]])
    labels = kinds_of(feats, 0.9)
    assert labels[0] == labels[1] == labels[5] and labels[2] == labels[3] and labels[0] != labels[2]
    assert labels[4] == -1  # unlike every other image
    assert (kinds_of(feats, -1.0) == 0).all()  # every pair linked: one kind


def blue_parts(n: int, defect: int | None = None) -> list[np.ndarray]:
    out = [np.clip(i.astype(np.int16)[..., ::-1] // 3 + np.array([0, 0, 150]), 0, 255).astype(np.uint8)
           for i in images(n)]
    if defect is not None:
        out[defect][30:40, 8:20] = (255, 255, 0)
    return out


def test_a_mixed_folder_is_scored_kind_by_kind() -> None:
    odd = np.zeros((48, 64, 3), np.uint8)
    odd[..., 1] = 200  # a green image: like neither kind
    folder = [*images(4, defect=1), *blue_parts(4, defect=2), odd]
    cfg = PriorConfig(map_side=32, kind_similarity=0.95)
    pr = compute_priors(folder, config=cfg, scorer=scorer())
    assert pr.mode == "folder" and pr.kinds is not None
    assert len(set(pr.kinds[:4])) == 1 and len(set(pr.kinds[4:8])) == 1 and pr.kinds[0] != pr.kinds[4]
    assert pr.kinds[8] == -1 and pr.maps[8] is None and np.isnan(pr.image_scores[8])
    assert int(np.argmax(pr.image_scores[:4])) == 1 and int(np.argmax(pr.image_scores[4:8])) == 2
    y, x = np.unravel_index(int(np.argmax(pr.maps[6])), pr.maps[6].shape)
    assert 13 <= y <= 21 and 2 <= x <= 11  # the yellow stain, found within its own kind
    sub = pr.subset([8, 1])
    assert sub.kinds.tolist() == [-1, pr.kinds[1]] and sub.maps[0] is None
    pooled = compute_priors(folder, config=PriorConfig(map_side=32, kind_similarity=None), scorer=scorer())
    assert pooled.kinds is None and all(m is not None for m in pooled.maps)  # the old behaviour: one set
    lone = compute_priors([images(1)[0], odd], config=cfg, scorer=scorer())
    assert lone.mode == "none" and lone.maps == [None, None]
    with pytest.raises(VMADError, match="kind_similarity"):
        PriorConfig(kind_similarity=2.0)


def tiles(defect: bool = False) -> np.ndarray:
    """A 48 x 64 surface repeating one 8 x 8 tile of noise (a texture: every patch has many twins)."""
    tile = np.random.default_rng(1).integers(60, 200, (8, 8, 3))
    out = np.tile(tile, (6, 8, 1)).astype(np.uint8)
    if defect:
        out[6:18, 40:56] = (250, 30, 30)
    return out


def tile_scorer() -> MuScScorer:
    """Features of 8 x 8 pixel tiles (one per grid cell), so a repeated tile gives repeated patches."""
    def features(imgs):
        x = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1)
                         for i in imgs])
        return [F.pixel_unshuffle(x, 8)], x.mean(dim=(2, 3))

    return MuScScorer(MuScConfig(image_size=64, grid_stride=8, degrees=(1,), rscin_k=(), map_size=16),
                      features=features)


def test_self_prior_finds_a_stain_in_a_lone_image() -> None:
    pr = compute_priors([tiles(defect=True)], config=PriorConfig(map_side=32, self_prior=True),
                        scorer=tile_scorer())
    assert pr.mode == "self" and pr.mode_of(0) == "self"
    m = pr.maps[0]
    assert m.shape == (24, 32)
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    assert 2 <= y <= 10 and 19 <= x <= 29  # the peak is on the stain
    assert m[3:9, 20:28].mean() > 3 * float(np.abs(m[15:, :12]).max())


def test_self_scores_leave_out_the_neighbourhood_and_keep_the_nearest_fraction() -> None:
    s = scorer()  # an 8 x 8 grid
    rows = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    levels = [rows.repeat_interleave(2, dim=2)]  # rows in pairs: a patch's one twin is just below or above
    levels[0][0, :, 0, 0] += 3.0  # but this one's
    twin = self_scores(s, levels, exclusion=0, fraction=0.0)
    no_twin = self_scores(s, levels, exclusion=1, fraction=0.0)  # the twin is now within the exclusion
    assert twin.shape == (1, 16, 16)
    assert float(np.median(twin)) < 1e-3 and float(np.median(no_twin)) > 0.1
    assert float(twin[0, 0, 0]) > 0.5  # the changed patch has no twin
    wide = self_scores(s, levels, exclusion=0, fraction=0.5)  # the nearest half, not just the twin
    assert float(np.median(wide)) > 0.1
    with pytest.raises(VMADError, match="self_exclusion"):
        PriorConfig(self_exclusion=-1)
    with pytest.raises(VMADError, match="self_exclusion too large"):
        self_scores(s, levels, exclusion=4, fraction=0.1)


def test_an_image_unlike_its_folder_gets_a_self_prior() -> None:
    odd = tiles(defect=True)  # a tiled surface with a stain: like none of the blue parts
    folder = [*blue_parts(4), odd]
    cfg = PriorConfig(map_side=32, kind_similarity=0.95, self_prior=True)
    pr = compute_priors(folder, config=cfg, scorer=scorer())
    assert pr.mode == "folder" and pr.kinds is not None and pr.kinds[4] == -1
    assert [pr.mode_of(i) for i in range(5)] == ["folder"] * 4 + ["self"]
    no_self = compute_priors(folder, config=PriorConfig(kind_similarity=0.95), scorer=scorer())
    assert no_self.maps[4] is None and no_self.mode_of(4) == "none"
    joined = join_priors([pr.subset([4]), pr.subset([0, 1])])
    assert joined.image_modes == ["self", "folder", "folder"] and joined.mode == "self"
    assert joined.kinds.tolist() == [-1, pr.kinds[0], pr.kinds[1]]
