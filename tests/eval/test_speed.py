"""What `vmad bench` compares against (vmad.eval.speed): the stock LLaVA + SAM shapes for each preset (the
paper preset's exactly, scaled-down ones named for the others) and the stock pipeline's outputs."""

from __future__ import annotations

import pytest
import torch

from vmad.errors import ConfigError
from vmad.eval.speed import BenchSettings, StockPipeline, stock_shapes
from vmad.model.build import build_vmad
from vmad.model.vmad import VMADModel


def test_paper_preset_stock_shapes_are_llava_1_5_7b_and_sam_vit_h() -> None:
    model = build_vmad("paper", random_weights=True)  # meta device: configs only, no memory
    shapes = stock_shapes(model)
    assert (shapes.text["hidden_size"], shapes.text["num_hidden_layers"]) == (4096, 32)
    vision = shapes.vision
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (336, 14, 1024)
    assert (shapes.sam_vision["hidden_size"], shapes.sam_vision["num_hidden_layers"]) == (1280, 32)
    assert shapes.sam_prompt == {}
    assert "own" in shapes.description["vision"] and "own" in shapes.description["sam"]


def test_small_preset_stock_shapes_are_scaled_down_and_say_so() -> None:
    model = build_vmad("small", random_weights=True)
    shapes = stock_shapes(model)
    assert shapes.text["hidden_size"] == 576 and shapes.text["num_hidden_layers"] == 30  # SmolLM2-135M
    assert shapes.vision["image_size"] // shapes.vision["patch_size"] == 24  # the same 24x24 token grid
    assert "scaled-down" in shapes.description["vision"] and "scaled-down" in shapes.description["sam"]
    assert shapes.sam_vision["image_size"] == 384 and shapes.sam_decoder["hidden_size"] == 256


def test_stock_pipeline_gives_masks_at_the_image_size_and_decodes_n_tokens(tiny_model: VMADModel) -> None:
    stock = StockPipeline(stock_shapes(tiny_model), torch.device("cpu"), torch.float32)
    masks = stock.segment(torch.rand(2, 3, 48, 80))
    assert masks.shape == (2, 48, 80) and bool(((masks >= 0) & (masks <= 1)).all())
    out = stock.decode(torch.rand(1, 3, 64, 64), 3)
    assert out.shape[1] == stock.ids.shape[1] + 3


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="image size"):
        BenchSettings(image_size=8).validate()
    with pytest.raises(ConfigError, match="repeats"):
        BenchSettings(repeats=0).validate()
