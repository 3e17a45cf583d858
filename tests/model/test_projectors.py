"""Projectors (Sec. III-D, Table V): shapes, deformable sampling (Eq. 18-19), odd grids, gradient flow and
configs. Tiny widths, CPU, a few seconds in all. LTC itself: test_ltc.py."""

from __future__ import annotations

import pytest
import torch

from vmad.errors import ConfigError
from vmad.model.build import build_projector
from vmad.model.deformable import DeformableAttention, grid_reference_points
from vmad.model.projectors import PROJECTOR_KINDS, ProjectorConfig, table_v_variants
from vmad_testing import PROJ_C, PROJ_D, PROJ_LEVEL_DIMS, PROJ_TINY, projector_inputs, tiny_projector

SHAPES = [("ltc", 144), ("avgpool", 144), ("ldpv2", 144), ("resampler", 144), ("mlp", 576)]


@pytest.mark.parametrize(("kind", "tokens"), SHAPES)
def test_output_shape_at_24x24(kind: str, tokens: int) -> None:
    proj = tiny_projector(kind=kind)
    last, levels = projector_inputs(24)
    with torch.no_grad():
        out = proj(last, levels)
    assert out.shape == (2, tokens, PROJ_D)
    assert proj.num_output_tokens(24) == tokens
    assert torch.isfinite(out).all()


def test_table_v_variants_all_build_and_run() -> None:
    last, levels = projector_inputs(6, batch=1)
    variants = table_v_variants(ProjectorConfig(**PROJ_TINY))
    assert {"ltc-baseline", "ltc-injection", "ltc", "mlp", "avgpool", "resampler", "ldpv2"} <= set(variants)
    for cfg in variants.values():
        proj = build_projector(cfg, PROJ_C, PROJ_LEVEL_DIMS, PROJ_D, 6)
        with torch.no_grad():
            assert proj(last, levels).shape == (1, proj.num_output_tokens(6), PROJ_D)


@pytest.mark.parametrize("kind", ["ltc", "avgpool", "ldpv2"])
@pytest.mark.parametrize("grid", [25, 7])
def test_grid_not_divisible_by_rho(kind: str, grid: int) -> None:
    proj = tiny_projector(grid=grid, kind=kind)
    last, levels = projector_inputs(grid)
    with torch.no_grad():
        out = proj(last, levels)
    side = -(-grid // 2)
    assert out.shape == (2, side * side, PROJ_D) and proj.num_output_tokens(grid) == side * side
    assert torch.isfinite(out).all()


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
    variant = table_v_variants(ProjectorConfig(**PROJ_TINY))[name].to_dict()
    cfg = ProjectorConfig.from_dict({**variant, "multi_include_last": name == "ltc"})
    torch.manual_seed(0)
    proj = build_projector(cfg, PROJ_C, PROJ_LEVEL_DIMS, PROJ_D, 6)
    last, levels = projector_inputs(6)
    last.requires_grad_(True)
    out = proj(last, levels)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in proj.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing}"
    assert last.grad is not None and last.grad.abs().sum() > 0


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
        build_projector(ProjectorConfig(**PROJ_TINY), PROJ_C, [16, 16], PROJ_D, 24)
    with pytest.raises(ConfigError):  # width not divisible by heads
        build_projector(ProjectorConfig(heads=5), PROJ_C, PROJ_LEVEL_DIMS, PROJ_D, 24)
    proj = tiny_projector(grid=6, kind="ltc")
    last, levels = projector_inputs(6)
    with pytest.raises(ValueError, match="levels"):
        proj(last, levels[:2])
    with pytest.raises(ValueError, match="square"):
        proj(last[:, :35], levels)


def test_resampler_query_count_is_configurable() -> None:
    proj = tiny_projector(grid=24, kind="resampler", num_queries=10)
    last, _ = projector_inputs(24, batch=1)
    with torch.no_grad():
        assert proj(last, []).shape == (1, 10, PROJ_D)
    assert proj.num_output_tokens(24) == 10
