"""Projectors (Sec. III-D, Table V): shapes, LTC ablation switches, window locality (Eq. 20), deformable
sampling (Eq. 18-19), odd grids and gradient flow. Tiny widths, CPU, a few seconds in all."""

from __future__ import annotations

import pytest
import torch

from vmad.errors import ConfigError
from vmad.model.build import build_projector
from vmad.model.deformable import DeformableAttention, grid_reference_points
from vmad.model.ltc import LTC, CoarseToFineRefinement, window_index
from vmad.model.projectors import PROJECTOR_KINDS, ProjectorConfig, table_v_variants

C, LEVEL_DIMS, D = 32, [16, 16, 32, 32], 48
TINY = {"heads": 4, "points": 2, "local_blocks": 1, "ffn_ratio": 1.0}
SHAPES = [("ltc", 144), ("avgpool", 144), ("ldpv2", 144), ("resampler", 144), ("mlp", 576)]
REFINES = [("none", False, 0), ("last", False, 1), ("multi", False, 4), ("multi", True, 5)]


def _inputs(grid: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    last = torch.randn(batch, grid * grid, C, generator=g)
    levels = [torch.randn(batch, grid * grid, c, generator=g) for c in LEVEL_DIMS]
    return last, levels


def _build(grid: int = 24, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_projector(ProjectorConfig(**{**TINY, **kw}), C, LEVEL_DIMS, D, grid)


@pytest.mark.parametrize(("kind", "tokens"), SHAPES)
def test_output_shape_at_24x24(kind: str, tokens: int) -> None:
    proj = _build(kind=kind)
    last, levels = _inputs(24)
    with torch.no_grad():
        out = proj(last, levels)
    assert out.shape == (2, tokens, D)
    assert proj.num_output_tokens(24) == tokens
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_local_context", [True, False])
@pytest.mark.parametrize(("refine", "include_last", "n_fine"), REFINES)
def test_ltc_ablation_switches(use_local_context: bool, refine: str, include_last: bool, n_fine: int) -> None:
    switches = {"refine": refine, "use_local_context": use_local_context, "multi_include_last": include_last}
    proj = _build(grid=8, kind="ltc", **switches)
    assert isinstance(proj, LTC)
    assert (proj.local_context is not None) == use_local_context
    if n_fine == 0:
        assert proj.refinement is None
    else:
        assert len(proj.refinement.levels) == n_fine
    last, levels = _inputs(8)
    with torch.no_grad():
        out = proj(last, levels if refine == "multi" else [])
    assert out.shape == (2, 16, D)


def test_table_v_variants_all_build_and_run() -> None:
    last, levels = _inputs(6, batch=1)
    variants = table_v_variants(ProjectorConfig(**TINY))
    assert {"ltc-baseline", "ltc-injection", "ltc", "mlp", "avgpool", "resampler", "ldpv2"} <= set(variants)
    for cfg in variants.values():
        proj = build_projector(cfg, C, LEVEL_DIMS, D, 6)
        with torch.no_grad():
            assert proj(last, levels).shape == (1, proj.num_output_tokens(6), D)


@pytest.mark.parametrize(("grid", "rho"), [(24, 2), (25, 2), (7, 2), (7, 3), (5, 4), (1, 2), (9, 3)])
def test_window_index_partitions_the_grid(grid: int, rho: int) -> None:
    index, valid = window_index(grid, rho)
    side = -(-grid // rho)
    assert index.shape == valid.shape == (side * side, rho * rho)
    members = index[valid].sort().values
    assert torch.equal(members, torch.arange(grid * grid))  # every fine cell exactly once
    assert valid.any(dim=1).all()  # no empty window
    for m in range(side * side):
        for fine in index[m][valid[m]].tolist():  # floor-index rule
            i, j = divmod(fine, grid)
            assert (i * side // grid, j * side // grid) == divmod(m, side)


@pytest.mark.parametrize("kind", ["ltc", "avgpool", "ldpv2"])
@pytest.mark.parametrize("grid", [25, 7])
def test_grid_not_divisible_by_rho(kind: str, grid: int) -> None:
    proj = _build(grid=grid, kind=kind)
    last, levels = _inputs(grid)
    with torch.no_grad():
        out = proj(last, levels)
    side = -(-grid // 2)
    assert out.shape == (2, side * side, D) and proj.num_output_tokens(grid) == side * side
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("grid", [24, 25])
def test_refinement_is_local_to_its_window(grid: int) -> None:
    torch.manual_seed(0)
    rho, side = 2, -(-grid // 2)
    refine = CoarseToFineRefinement(C, LEVEL_DIMS, heads=4, rho=rho, pos_embed=True).eval()
    _, fines = _inputs(grid)
    coarse = torch.randn(2, side * side, C)
    index, valid = window_index(grid, rho)
    m = side * side - 1 if grid % 2 else 5 * side + 7  # a clipped corner window on odd grids
    inside = index[m][valid[m]]
    outside = torch.ones(grid * grid, dtype=torch.bool)
    outside[inside] = False
    with torch.no_grad():
        base = refine(coarse, fines, grid)
        perturbed = [f.clone() for f in fines]
        for f in perturbed:
            f[:, outside] += 5.0 * torch.randn_like(f[:, outside])
        out = refine(coarse, perturbed, grid)
        torch.testing.assert_close(out[:, m], base[:, m], rtol=0, atol=1e-5)
        assert (out - base).abs().amax(dim=(0, 2)).gt(1e-3).sum() == side * side - 1  # all others moved
        one_in = [f.clone() for f in fines]
        one_in[0][:, inside[-1]] += 5.0 * torch.randn(LEVEL_DIMS[0])  # not constant: LayerNorm removes it
        assert not torch.allclose(refine(coarse, one_in, grid)[:, m], base[:, m], atol=1e-3)


def test_ltc_levels_reach_a_coarse_token_only_through_its_window() -> None:
    """End to end: the earlier levels enter LTC only via Eq. 20, so they act window by window."""
    proj = _build(grid=8, kind="ltc", refine="multi").eval()
    last, levels = _inputs(8)
    index, valid = window_index(8, 2)
    m = 9
    outside = torch.ones(64, dtype=torch.bool)
    outside[index[m][valid[m]]] = False
    with torch.no_grad():
        base = proj(last, levels)
        moved = [lv.clone() for lv in levels]
        for lv in moved:
            lv[:, outside] = torch.randn_like(lv[:, outside])
        out = proj(last, moved)
    torch.testing.assert_close(out[:, m], base[:, m], rtol=0, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)


def _identity_deformable(
    heads: int, points: int, dim: int, offsets: torch.Tensor | None
) -> DeformableAttention:
    att = DeformableAttention(dim, heads, points)
    with torch.no_grad():
        for lin in (att.value_proj, att.output_proj):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
        att.sampling_offsets.weight.zero_()
        bias = torch.zeros(heads * points * 2) if offsets is None else offsets.reshape(-1)
        att.sampling_offsets.bias.copy_(bias)
        att.attention_weights.weight.zero_()
        att.attention_weights.bias.zero_()  # uniform weights over the K points
    return att


def test_deformable_zero_offsets_uniform_weights_is_a_bilinear_average() -> None:
    # 3x3 single-channel map with values 0..8 (row-major): value at (x=col, y=row) is 3*row + col.
    value = torch.arange(9.0).view(1, 9, 1)
    att = _identity_deformable(heads=1, points=3, dim=1, offsets=None)
    ref = torch.tensor([[0.5, 0.5], [2.0, 1.0], [1.0, 1.5], [-0.5, 0.0], [2.25, 2.0]])
    out = att(torch.zeros(1, 5, 1), value, ref, (3, 3))[0, :, 0]
    expected = torch.tensor(
        [
            (0 + 1 + 3 + 4) / 4,  # centre of cells (0,0), (0,1), (1,0), (1,1)
            5.0,  # exactly on cell (row 1, col 2)
            (4 + 7) / 2,  # half way between rows 1 and 2 in column 1
            0.5 * 0.0,  # half outside the grid: zero padding
            0.75 * 8,  # a quarter cell past the last column: zero padding
        ]
    )
    torch.testing.assert_close(out, expected)


def test_deformable_offsets_and_uniform_weights_average_the_sampled_points() -> None:
    value = torch.arange(16.0).view(1, 16, 1)  # 4x4, value 4*row + col
    offsets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.5, -0.5], [0.25, 0.0]])  # (dx, dy) per point
    att = _identity_deformable(heads=1, points=4, dim=1, offsets=offsets)
    ref = torch.tensor([[1.0, 1.0]])  # cell (row 1, col 1) = 5
    out = att(torch.zeros(1, 1, 1), value, ref, (4, 4))[0, 0, 0]
    samples = [6.0, 9.0, (0 + 1 + 4 + 5) / 4, 5.25]
    torch.testing.assert_close(out, torch.tensor(sum(samples) / 4))


def _naive_bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [C, H, W]; zero outside; cell centres at integers."""
    c, h, w = img.shape
    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
    out = torch.zeros(c)
    for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
        for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def test_deformable_matches_a_naive_reference() -> None:
    torch.manual_seed(0)
    b, h, w, dim, heads, points = 2, 5, 4, 8, 2, 3
    att = DeformableAttention(dim, heads, points, offset_scale=1.5)
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.5)
    query, value = torch.randn(b, 7, dim), torch.randn(b, h * w, dim)
    ref = torch.rand(b, 7, 2) * torch.tensor([w - 1.0, h - 1.0])
    out = att(query, value, ref, (h, w))
    hd = dim // heads
    with torch.no_grad():
        v = att.value_proj(value).view(b, h, w, heads, hd)
        offs = att.sampling_offsets(query).view(b, 7, heads, points, 2) * 1.5
        wts = att.attention_weights(query).view(b, 7, heads, points).softmax(-1)
        expected = torch.zeros(b, 7, heads, hd)
        for bi in range(b):
            for qi in range(7):
                for hi in range(heads):
                    img = v[bi, :, :, hi].permute(2, 0, 1)
                    for k in range(points):
                        x, y = (ref[bi, qi] + offs[bi, qi, hi, k]).tolist()
                        expected[bi, qi, hi] += wts[bi, qi, hi, k] * _naive_bilinear(img, x, y)
        expected = att.output_proj(expected.reshape(b, 7, dim))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_reference_points_are_row_major_cell_centres() -> None:
    ref = grid_reference_points(2, 3)
    assert ref.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


@pytest.mark.parametrize("name", list(table_v_variants()))
def test_gradients_reach_every_parameter(name: str) -> None:
    variant = table_v_variants(ProjectorConfig(**TINY))[name].to_dict()
    cfg = ProjectorConfig.from_dict({**variant, "multi_include_last": name == "ltc"})
    torch.manual_seed(0)
    proj = build_projector(cfg, C, LEVEL_DIMS, D, 6)
    last, levels = _inputs(6)
    last.requires_grad_(True)
    out = proj(last, levels)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in proj.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing}"
    assert last.grad is not None and last.grad.abs().sum() > 0


def test_ltc_hidden_width_differs_from_encoder_width() -> None:
    proj = _build(grid=6, kind="ltc", hidden=24, heads=4)
    last, levels = _inputs(6)
    assert proj(last, levels).shape == (2, 9, D)
    assert proj.compress(last, levels).shape == (2, 9, 24)


def test_config_round_trip_and_errors() -> None:
    cfg = ProjectorConfig(kind="resampler", num_queries=64)
    assert ProjectorConfig.from_dict(cfg.to_dict()) == cfg
    assert set(PROJECTOR_KINDS) == {"ltc", "mlp", "avgpool", "resampler", "ldpv2"}
    with pytest.raises(ConfigError):
        ProjectorConfig(kind="qformer")
    with pytest.raises(ConfigError):
        ProjectorConfig(refine="all")
    with pytest.raises(ConfigError):
        ProjectorConfig.from_dict({"kind": "ltc", "rh0": 2})
    with pytest.raises(ConfigError):  # multi-level needs n level widths
        build_projector(ProjectorConfig(**TINY), C, [16, 16], D, 24)
    with pytest.raises(ConfigError):  # width not divisible by heads
        build_projector(ProjectorConfig(heads=5), C, LEVEL_DIMS, D, 24)
    proj = _build(grid=6, kind="ltc")
    last, levels = _inputs(6)
    with pytest.raises(ValueError, match="levels"):
        proj(last, levels[:2])
    with pytest.raises(ValueError, match="square"):
        proj(last[:, :35], levels)


def test_resampler_query_count_is_configurable() -> None:
    proj = _build(grid=24, kind="resampler", num_queries=10)
    last, _ = _inputs(24, batch=1)
    with torch.no_grad():
        assert proj(last, []).shape == (1, 10, D)
    assert proj.num_output_tokens(24) == 10
