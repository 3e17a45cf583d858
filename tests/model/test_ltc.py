"""LTC (Sec. III-D): ablation switches, window partition of odd grids, window locality of the
coarse-to-fine refinement (Eq. 20), hidden width. Tiny widths, CPU."""

from __future__ import annotations

import pytest
import torch

from vmad.model.ltc import LTC, CoarseToFineRefinement, window_index
from vmad_testing import PROJ_C, PROJ_D, PROJ_LEVEL_DIMS, projector_inputs, tiny_projector

REFINES = [("none", False, 0), ("last", False, 1), ("multi", False, 4), ("multi", True, 5)]


@pytest.mark.parametrize("use_local_context", [True, False])
@pytest.mark.parametrize(("refine", "include_last", "n_fine"), REFINES)
def test_ltc_ablation_switches(use_local_context: bool, refine: str, include_last: bool, n_fine: int) -> None:
    switches = {"refine": refine, "use_local_context": use_local_context, "multi_include_last": include_last}
    proj = tiny_projector(grid=8, kind="ltc", **switches)
    assert isinstance(proj, LTC)
    assert (proj.local_context is not None) == use_local_context
    if n_fine == 0:
        assert proj.refinement is None
    else:
        assert len(proj.refinement.levels) == n_fine
    last, levels = projector_inputs(8)
    with torch.no_grad():
        out = proj(last, levels if refine == "multi" else [])
    assert out.shape == (2, 16, PROJ_D)


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


@pytest.mark.parametrize("grid", [24, 25])
def test_refinement_is_local_to_its_window(grid: int) -> None:
    torch.manual_seed(0)
    rho, side = 2, -(-grid // 2)
    refine = CoarseToFineRefinement(PROJ_C, PROJ_LEVEL_DIMS, heads=4, rho=rho, pos_embed=True).eval()
    _, fines = projector_inputs(grid)
    coarse = torch.randn(2, side * side, PROJ_C)
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
        # not constant: LayerNorm removes it
        one_in[0][:, inside[-1]] += 5.0 * torch.randn(PROJ_LEVEL_DIMS[0])
        assert not torch.allclose(refine(coarse, one_in, grid)[:, m], base[:, m], atol=1e-3)


def test_ltc_levels_reach_a_coarse_token_only_through_its_window() -> None:
    """End to end: the earlier levels enter LTC only via Eq. 20, so they act window by window."""
    proj = tiny_projector(grid=8, kind="ltc", refine="multi").eval()
    last, levels = projector_inputs(8)
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


def test_ltc_hidden_width_differs_from_encoder_width() -> None:
    proj = tiny_projector(grid=6, kind="ltc", hidden=24, heads=4)
    last, levels = projector_inputs(6)
    assert proj(last, levels).shape == (2, 9, PROJ_D)
    assert proj.compress(last, levels).shape == (2, 9, 24)
