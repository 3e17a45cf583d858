"""Encoder preprocessing as the libraries do it (LLaVA-1.5's pad-to-square, SAM's longest side + pad), and
masks mapped back to the image through the inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vmad.model.config import VMADConfig
from vmad.model.image_encoders import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, FrozenImageModule


def _photo(height: int = 200, width: int = 300) -> np.ndarray:
    """A smooth 3:2 test image with texture (uint8)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    channels = [np.sin(x / 17.0 + c) * np.cos(y / 11.0 - c) * 90 + 128 for c in range(3)]
    image = np.stack(channels, axis=2) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def test_pad_square_equals_the_llava_image_processor() -> None:
    from transformers import LlavaImageProcessor

    image = _photo()
    processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    expected = processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    ours = FrozenImageModule(336, CLIP_MEAN, CLIP_STD, "pad_square").prepare(_tensor(image))
    assert ours.shape == expected.shape == (1, 3, 336, 336)
    assert float((ours - expected).abs().max()) < 1e-3
    stretched = FrozenImageModule(336, CLIP_MEAN, CLIP_STD, "stretch").prepare(_tensor(image))
    assert float((stretched - expected).abs().max()) > 0.5  # the old rule distorts a 3:2 image


def test_longest_side_equals_the_sam_image_processor() -> None:
    from transformers import SamImageProcessor

    image = _photo()
    expected = SamImageProcessor()(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    ours = FrozenImageModule(1024, SAM_MEAN, SAM_STD, "longest_side").prepare(_tensor(image))
    assert ours.shape == expected.shape == (1, 3, 1024, 1024)
    assert float((ours - expected).abs().max()) < 1e-3
    assert float(ours[..., 683:, :].abs().max()) == 0.0  # 200 x 300 -> 683 x 1024, padded below


@pytest.mark.parametrize("rule", ["pad_square", "longest_side", "stretch"])
def test_masks_map_back_onto_the_right_pixels(rule: str) -> None:
    """An off-centre square in a 3:2 image, seen in the input frame at the decoder's low resolution, comes
    back on the same pixels of the image."""
    mask = np.zeros((200, 300), dtype=np.uint8)
    mask[30:90, 200:260] = 255
    frame = FrozenImageModule(256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), rule)
    seen = frame.prepare(_tensor(np.repeat(mask[:, :, None], 3, axis=2)))[:, :1]  # the mask in the frame
    low = torch.nn.functional.interpolate(seen, size=(64, 64), mode="area")  # a decoder's 64x64 output
    back = frame.to_image(low, (200, 300))[0, 0] > 0.5
    truth = torch.from_numpy(mask > 0)
    iou = float((back & truth).sum()) / float((back | truth).sum())
    assert back.shape == (200, 300) and iou > 0.85, iou
    rows, cols = torch.nonzero(back, as_tuple=True)
    assert abs(float(rows.float().mean()) - 59.5) < 2 and abs(float(cols.float().mean()) - 229.5) < 2


def test_models_saved_before_the_rule_keep_stretching() -> None:
    from vmad.model.build import preset_config

    saved = preset_config("paper").to_dict()
    for section in ("vision", "backbone"):
        del saved[section]["resize"]
    legacy = VMADConfig.from_dict(saved)
    assert legacy.vision.resize == legacy.backbone.resize == "stretch"
    fresh = preset_config("small")
    assert fresh.vision.resize == "pad_square" and preset_config("paper").backbone.resize == "longest_side"
