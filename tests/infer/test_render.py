"""The overlay renderer: heat colours, overlay and mask contour on hand-made maps, atomic PNG writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vmad.infer.render import heat_colors, mask_contour, overlay, save_png
from vmad_testing import random_rgb


def test_heat_colors_endpoints():
    c = heat_colors(np.array([0.0, 0.5, 1.0, np.nan, 2.0]))
    assert c.tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0], [0, 0, 128], [128, 0, 0]]


def test_overlay_colours_and_contour_on_a_hand_made_map():
    img = np.full((10, 12, 3), 100, dtype=np.uint8)
    pmap = np.zeros((10, 12), dtype=np.float32)
    pmap[:, 6:] = 1.0
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:7, 3:9] = True
    out = overlay(img, pmap, mask, alpha=0.5)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [50, 50, 114]        # p = 0 -> blend with dark blue
    assert out[0, 11].tolist() == [114, 50, 50]       # p = 1 -> blend with dark red
    ring = np.zeros_like(mask)
    ring[2:7, 3:9] = True
    ring[3:6, 4:8] = False
    white = (out == 255).all(axis=2)
    assert np.array_equal(white, ring)
    assert out[4, 5].tolist() == [50, 50, 114]        # mask interior keeps the heat colour
    # Width 2 and a region on the image edge (closed by the border).
    edge = np.zeros((8, 8), dtype=bool)
    edge[:5, :5] = True
    assert mask_contour(edge, 1).sum() == 25 - 9 and mask_contour(edge, 2).sum() == 25 - 1
    assert np.array_equal(overlay(img[:, :, 0], pmap, None, alpha=0.0), img)


def test_overlay_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.float32))


def test_save_png_is_atomic_and_round_trips(tmp_path):
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:5] = True
    path = save_png(tmp_path / "sub" / "m.png", mask)
    arr = np.array(Image.open(path))
    assert arr.dtype == np.uint8 and set(np.unique(arr)) == {0, 255} and np.array_equal(arr == 255, mask)
    rgb = random_rgb(5, 7)
    save_png(path, rgb)  # replaces the file
    assert np.array_equal(np.array(Image.open(path)), rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]  # no temporary file left
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", np.zeros((3, 3), dtype=np.float32))
    assert not (tmp_path / "f.png").exists()
