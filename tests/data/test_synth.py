"""Synthetic defects (exact masks, determinism, grey stays grey) and the templated RIAD text."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vmad.data.synth import SYNTHETIC_KINDS, SynthConfig, estimate_foreground, is_grey, synthesize
from vmad.data.text import (
    DEFECT_CATEGORIES,
    SYNTHETIC_CATEGORY,
    canonical_category,
    defect_answers,
    defect_name,
    grid_cell,
    mask_facts,
    normal_answers,
    normal_description,
)
from vmad.errors import ConfigError


def _texture(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth colour texture with a gradient (a 'surface' image)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((h, w, 3)), (3, 3, 0)) * 120
    ramp = np.linspace(60, 160, w)[None, :, None]
    return np.clip(field + ramp, 0, 255).astype(np.uint8)


def _grey(h: int = 80, w: int = 100) -> np.ndarray:
    return np.repeat(_texture(h, w, seed=1)[..., :1], 3, axis=2)


def _object(h: int = 120, w: int = 120) -> np.ndarray:
    """A textured disc on a uniform white background."""
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.35 * min(h, w)) ** 2
    img[disc] = _texture(h, w, seed=2)[disc] // 2
    return img


IMAGES = {"texture": _texture, "grey": _grey, "object": _object, "tiny": lambda: _texture(24, 32, seed=3)}


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
@pytest.mark.parametrize("image_name", sorted(IMAGES))
def test_mask_is_exactly_the_changed_pixels(kind: str, image_name: str) -> None:
    image = IMAGES[image_name]()
    before = image.copy()
    for seed in range(3):
        defect = synthesize(image, np.random.default_rng(seed), kind)
        assert defect.kind == kind
        assert defect.image.shape == image.shape and defect.image.dtype == np.uint8
        assert defect.mask.shape == image.shape[:2] and defect.mask.dtype == bool
        assert defect.mask.sum() >= min(SynthConfig().min_pixels, image.shape[0] * image.shape[1] // 16)
        changed = (defect.image != image).any(axis=2)
        assert not changed[~defect.mask].any(), "a pixel outside the mask changed"
        assert changed[defect.mask].all(), "a pixel inside the mask is unchanged"
        if image_name == "grey":
            assert is_grey(defect.image)
    np.testing.assert_array_equal(image, before)  # the input is not modified


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_deterministic_for_a_seed(kind: str) -> None:
    image = _texture()
    a = synthesize(image, np.random.default_rng(7), kind)
    b = synthesize(image, np.random.default_rng(7), kind)
    c = synthesize(image, np.random.default_rng(8), kind)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_kind_drawn_from_config_and_errors() -> None:
    image = _texture()
    cfg = SynthConfig(kinds=("spot",))
    assert synthesize(image, np.random.default_rng(0), cfg=cfg).kind == "spot"
    with pytest.raises(ConfigError):
        synthesize(image, np.random.default_rng(0), "dent")
    with pytest.raises(ConfigError):
        SynthConfig(kinds=("scratch", "dent"))
    with pytest.raises(ConfigError):
        SynthConfig(size_range=(0.5, 0.2))
    with pytest.raises(ValueError):
        synthesize(image[..., 0], np.random.default_rng(0), "spot")


def test_foreground_estimate_and_defects_stay_on_the_object() -> None:
    image = _object()
    fg = estimate_foreground(image)
    assert fg is not None
    yy, xx = np.mgrid[0:120, 0:120]
    disc = (yy - 60) ** 2 + (xx - 60) ** 2 < 42**2
    assert (fg == disc).mean() > 0.97
    assert estimate_foreground(_texture()) is None
    for kind in SYNTHETIC_KINDS:
        for seed in range(3):
            defect = synthesize(image, np.random.default_rng(seed), kind)
            assert not (defect.mask & ~fg).any(), kind
    # A missing piece shows the background there (apart from its lighter fracture rim).
    defect = synthesize(image, np.random.default_rng(0), "missing_piece")
    inner = ndimage.binary_erosion(defect.mask, iterations=2)
    if inner.any():
        assert np.abs(defect.image[inner].astype(int) - 245).mean() < 20


# ----------------------------------------------------------------------------------------------- text


def test_category_table_and_mapping() -> None:
    ids = [c.id for c in DEFECT_CATEGORIES]
    assert ids == list(range(1, 16))
    assert len({c.name for c in DEFECT_CATEGORIES}) == 15
    cases = {
        "Blowhole": "hole",
        "MT_Break": "broken",
        "broken_large": "broken",
        "Crack": "crack",
        "Fray": "fray",
        "Uneven": "uneven",
        "scratches": "scratch",
        "scratch_head": "scratch",
        "inclusion+patches": "inclusion",
        "patches": "discoloration",
        "contamination": "contamination",
        "synthetic_missing_piece": "broken",
        "synthetic_foreign_texture": "foreign_texture",
        "cut_lead": "cut",
        "faulty_imprint": "other",
        "anomaly": "other",
    }
    assert {k: canonical_category(k).name for k in cases} == cases
    assert all(canonical_category(f"synthetic_{k}").name == v for k, v in SYNTHETIC_CATEGORY.items())
    assert defect_name("synthetic_missing_piece") == "missing piece"
    assert defect_name("inclusion+scratches") == "inclusion and scratches"


def test_grid_cells_and_mask_facts() -> None:
    assert grid_cell(0, 0, 90, 90) == "upper left"
    assert grid_cell(45, 45, 90, 90) == "center"
    assert grid_cell(89, 89, 90, 90) == "lower right"
    assert grid_cell(10, 60, 90, 90) == "upper right"
    assert mask_facts(np.zeros((10, 10), bool)) is None

    mask = np.zeros((100, 200), bool)
    mask[5:15, 10:30] = True  # 200 px = 1 % of 20000
    facts = mask_facts(mask)
    assert (facts.count, facts.area, facts.box, facts.where) == (1, 200, (20, 10), "upper left")
    assert facts.size_word == "medium" and facts.fraction == pytest.approx(0.01)
    mask[5:14, 10:30] = True
    mask[14, :] = False
    assert mask_facts(mask).size_word == "small"

    mask = np.zeros((90, 90), bool)
    mask[70:80, 5:15] = True  # lower left, 100 px
    mask[40:50, 70:85] = True  # right, 150 px
    facts = mask_facts(mask)
    assert facts.count == 2 and facts.region_cells == ("right", "lower left")
    mask[:, :] = False
    mask[0:60, 0:90] = True
    assert mask_facts(mask).size_word == "large"


def test_defect_answers_use_type_location_size_count() -> None:
    mask = np.zeros((100, 100), bool)
    mask[5:20, 70:90] = True  # upper right, 300 px = 3 %
    texts = set()
    for seed in range(20):
        answers = defect_answers("Blowhole", mask, "magnetic_tile", np.random.default_rng(seed))
        assert set(answers) == {"description", "impact", "suggestion"}
        d = answers["description"]
        assert "hole" in d and "upper right" in d and "20 x 15 px" in d and "magnetic tile" in d
        assert "medium" in d
        assert all(isinstance(v, str) and v for v in answers.values())
        texts.add(d)
    assert len(texts) >= 2, "several phrasings are used"
    a = defect_answers("crack", mask, "tile", np.random.default_rng(3))
    assert a == defect_answers("crack", mask, "tile", np.random.default_rng(3))

    two = np.zeros((90, 90), bool)
    two[70:80, 5:15] = True
    two[40:50, 70:85] = True
    d = defect_answers("scratch", two, "plate", np.random.default_rng(0))["description"]
    assert "two" in d.lower() and "scratches" in d
    for seed in range(4):
        blank = defect_answers("Uneven", np.zeros((10, 10), bool), "tile", np.random.default_rng(seed))
        d = blank["description"]
        assert "uneven" in d and ("not marked" in d or "no region" in d)


def test_normal_texts() -> None:
    desc = normal_description("metal_plate", np.random.default_rng(0))
    assert "metal plate" in desc
    answers = normal_answers("metal_plate")
    assert "No defect" in answers["description"] and "No action" in answers["suggestion"]


def test_synthesize_kinds_paints_in_order_with_disjoint_masks() -> None:
    from vmad.data.synth import synthesize_kinds

    base = np.random.default_rng(3).integers(90, 160, (64, 64, 3), dtype=np.uint8)
    image, masks = synthesize_kinds(base, np.random.default_rng(5), ("spot", "contamination"))
    assert len(masks) == 2 and all(m.dtype == bool and m.shape == (64, 64) for m in masks)
    assert not (masks[0] & masks[1]).any()  # the first kind's mask loses what the second covers
    changed = (image != base).any(axis=2)
    assert not ((masks[0] | masks[1]) & ~changed).any() and masks[1].any()
    rng = np.random.default_rng(5)  # the same draws as two synthesize calls in a row
    first = synthesize(base, rng, "spot")
    second = synthesize(first.image, rng, "contamination")
    assert np.array_equal(image, second.image) and np.array_equal(masks[1], second.mask.astype(bool))
    assert np.array_equal(masks[0], first.mask.astype(bool) & ~second.mask.astype(bool))
