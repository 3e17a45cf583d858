"""Ψ starts from LLaVA's pretrained projector (``projector.init_from_llava``, OURS; issue 13 item 5)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmad.errors import ConfigError
from vmad.model.build import build_projector, build_vmad, preset_config
from vmad.model.layers import map_to_tokens, tokens_to_map
from vmad.model.ltc import LTC
from vmad.model.projectors import ProjectorConfig
from vmad_testing import tiny_hf_folders, tiny_paper_config


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, nn.Module]:
    """A tiny random LLaVA (CLIP + Llama + multi_modal_projector) and SAM folder in Hugging Face format, and
    the saved LLaVA's ``multi_modal_projector``."""
    return tiny_hf_folders(tmp_path_factory.mktemp("hf"), randomize_projector=True)


def _paper(folders: tuple[Path, Path, nn.Module], init: bool):  # noqa: ANN202
    cfg = tiny_paper_config()
    cfg.projector.init_from_llava = init
    return build_vmad(cfg, llava_path=str(folders[0]), sam_path=str(folders[1]))


def _pooled_llava(folders: tuple[Path, Path, nn.Module], last: torch.Tensor) -> torch.Tensor:
    """LLaVA's own projector on the 2x2 average-pooled encoder tokens."""
    pooled = map_to_tokens(F.avg_pool2d(tokens_to_map(last.float(), 4), 2))  # 4x4 grid -> 2x2
    with torch.no_grad():
        return folders[2](pooled)


def test_paper_ltc_starts_as_llava_projector_on_pooled_tokens(
    hf_folders: tuple[Path, Path, nn.Module],
) -> None:
    model = _paper(hf_folders, init=True)
    assert model.config.projector.init_from_llava and isinstance(model.projector, LTC)
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        encoded = model.encode_images(images)
    expected = _pooled_llava(hf_folders, encoded.last)
    assert tuple(encoded.visual_tokens.shape) == (2, 4, 64)
    torch.testing.assert_close(encoded.visual_tokens, expected, atol=1e-5, rtol=1e-5)
    # The zeroed residual branches still learn: their last layers get a gradient at step 0.
    ltc = model.projector
    ltc.train()
    last, levels = model.vision_encoder(images)
    ltc(last.float(), [level.float() for level in levels]).square().sum().backward()
    zeroed = ltc.residual_outputs()
    assert len(zeroed) == 2 * 3 + 2 * 2 + 1  # 2 local-context blocks x 3, 2 + 2 ResNet blocks, Eq. 21 fusion
    assert all(not m.weight.any() and m.weight.grad is not None and m.weight.grad.any() for m in zeroed)


def test_switch_off_keeps_a_random_ltc(hf_folders: tuple[Path, Path, nn.Module]) -> None:
    model = _paper(hf_folders, init=False)
    with torch.no_grad():
        encoded = model.encode_images(torch.rand(1, 3, 56, 56))
    expected = _pooled_llava(hf_folders, encoded.last)
    assert not torch.allclose(encoded.visual_tokens, expected, atol=1e-3)
    assert model.projector.downsampler.pre[0].body[-1].weight.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mlp", "avgpool"])
def test_llava_mlp_copied_into_mlp_and_avgpool_projectors(kind: str) -> None:
    from vmad.model.build import init_projector_from_llava

    class FakeLlava(nn.Module):  # the attribute layout of transformers >= 4.52
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.multi_modal_projector = nn.Module()
            self.model.multi_modal_projector.linear_1 = nn.Linear(8, 16)
            self.model.multi_modal_projector.linear_2 = nn.Linear(16, 16)

    llava = FakeLlava()
    proj = build_projector(ProjectorConfig(kind=kind), 8, [], 16, 4)
    assert init_projector_from_llava(proj, llava)
    assert torch.equal(proj.mlp[0].weight, llava.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(proj.mlp[2].bias, llava.model.multi_modal_projector.linear_2.bias)
    assert not init_projector_from_llava(build_projector(ProjectorConfig(kind="ldpv2"), 8, [], 16, 4), llava)
    assert not init_projector_from_llava(proj, None)


def test_start_from_mlp_on_an_odd_grid_and_width_errors() -> None:
    torch.manual_seed(0)
    cfg = ProjectorConfig(kind="ltc", heads=4, points=2, refine="multi", n_levels=2, multi_include_last=True)
    ltc = build_projector(cfg, 8, [8, 8], 16, 5)
    l1, l2 = nn.Linear(8, 16), nn.Linear(16, 16, bias=False)
    ltc.start_from_mlp(l1, l2)
    x = torch.randn(2, 25, 8)
    pooled = map_to_tokens(F.adaptive_avg_pool2d(tokens_to_map(x, 5), 3))
    with torch.no_grad():
        torch.testing.assert_close(ltc(x, [torch.randn(2, 25, 8)] * 2), l2(F.gelu(l1(pooled))))
    assert not ltc.head[2].bias.any()
    with pytest.raises(ConfigError, match="projector.hidden"):
        build_projector(replace(cfg, hidden=12), 8, [8, 8], 16, 5).start_from_mlp(l1, l2)
    with pytest.raises(ConfigError, match="does not fit"):
        build_projector(cfg, 8, [8, 8], 32, 5).start_from_mlp(l1, l2)


def test_presets_without_llava_are_unchanged() -> None:
    on = build_vmad("tiny").projector.state_dict()
    cfg = preset_config("tiny")
    cfg.projector.init_from_llava = False
    off = build_vmad(cfg).projector.state_dict()
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    meta = build_vmad("paper", random_weights=True)
    assert meta.projector.head[0].weight.is_meta and meta.config.projector.init_from_llava
