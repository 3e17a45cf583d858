"""Image and mask loading: modes, bad files, thresholds, size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.data import MASK_THRESHOLD, Sample, check_sample, image_shape, read_image, read_mask
from vmad.errors import DataError


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGB", ".png"),
        ("L", ".png"),
        ("RGBA", ".png"),
        ("P", ".png"),
        ("I;16", ".png"),
        ("RGB", ".jpg"),
        ("L", ".jpg"),
    ],
)
def test_read_image_modes_give_rgb_uint8(tmp_path: Path, data_factory, mode: str, suffix: str) -> None:
    path = data_factory.write_image(tmp_path / f"im{suffix}", size=(20, 12), mode=mode, seed=3)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really has the mode under test
    arr = read_image(path)
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_rgb_values_preserved_and_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [200, 100, 50]


def test_sixteen_bit_scaled_to_eight_bit(tmp_path: Path) -> None:
    arr = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 255, 128]


def test_palette_image_colours(tmp_path: Path) -> None:
    im = Image.new("P", (3, 2))
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out[1, 1].tolist() == [10, 20, 30] and out[0, 0].tolist() == [0, 0, 0]


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_data_error_naming_file(tmp_path: Path, data_factory, suffix: str) -> None:
    path = _truncate(data_factory.write_image(tmp_path / f"t{suffix}", size=(64, 64)))
    image_shape(path)  # the header is intact: only a full decode notices
    with pytest.raises(DataError) as err:
        read_image(path)
    assert err.value.path == path and "truncated" in str(err.value)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    for fn in (read_image, image_shape):
        with pytest.raises(DataError, match="junk.png: not a readable image"):
            fn(junk)
        with pytest.raises(DataError, match="missing.png: file not found"):
            fn(tmp_path / "missing.png")


def _sample(image: Path, mask: Path | None, spec: str = "png", label: int = 1) -> Sample:
    return Sample(image, "c", label, "d" if label else "good", "test", mask_path=mask, mask_spec=spec)


def test_mask_threshold_is_inclusive_at_128(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(4, 1))
    Image.fromarray(np.array([[0, MASK_THRESHOLD - 1, MASK_THRESHOLD, 255]], dtype=np.uint8)).save(
        tmp_path / "m.png"
    )
    assert read_mask(_sample(image, tmp_path / "m.png")).tolist() == [[False, False, True, True]]


def test_nonzero_spec_for_class_id_masks(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(4, 1))
    Image.fromarray(np.array([[0, 1, 2, 3]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert read_mask(_sample(image, tmp_path / "m.png", "png-nonzero")).tolist() == [
        [False, True, True, True]
    ]
    assert not read_mask(_sample(image, tmp_path / "m.png", "png")).any()


def test_colour_and_sixteen_bit_masks(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(2, 1))
    Image.fromarray(np.array([[[0, 0, 0], [255, 0, 0]]], dtype=np.uint8)).save(tmp_path / "red.png")
    assert read_mask(_sample(image, tmp_path / "red.png")).tolist() == [[False, True]]
    Image.fromarray(np.array([[100, 65535]], dtype=np.uint16)).save(tmp_path / "m16.png")
    assert read_mask(_sample(image, tmp_path / "m16.png")).tolist() == [[False, True]]


def test_normal_sample_without_mask_is_all_false(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(7, 5))
    mask = read_mask(_sample(image, None, label=0))
    assert mask.shape == (5, 7) and mask.dtype == bool and not mask.any()
    assert read_mask(_sample(image, None, label=0), size=(3, 4)).shape == (3, 4)


def test_blank_mask_on_anomalous_image_is_accepted(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png")
    mask = read_mask(_sample(image, data_factory.write_mask(tmp_path / "m.png", box=None)))
    assert mask.shape == (24, 32) and not mask.any()


def test_resize_to_size_height_width(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(32, 24))
    mask_path = data_factory.write_mask(tmp_path / "m.png", size=(32, 24), box=(0, 0, 16, 24))
    small = read_mask(_sample(image, mask_path), size=(12, 8))
    assert small.shape == (12, 8) and small[:, :4].all() and not small[:, 4:].any()


def test_size_mismatch_names_both_files(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "img.png", size=(32, 24))
    mask_path = data_factory.write_mask(tmp_path / "msk.png", size=(30, 24))
    sample = _sample(image, mask_path)
    for call in (
        lambda: read_mask(sample),
        lambda: check_sample(sample),
        lambda: check_sample(sample, decode=True),
    ):
        with pytest.raises(DataError) as err:
            call()
        assert "msk.png" in str(err.value) and "img.png" in str(err.value) and "30x24" in str(err.value)


def test_check_sample_decode_catches_truncated_mask(tmp_path: Path, data_factory) -> None:
    image = data_factory.write_image(tmp_path / "i.png", size=(64, 64))
    mask_path = _truncate(data_factory.write_image(tmp_path / "m.png", size=(64, 64), mode="L"), 0.6)
    check_sample(_sample(image, mask_path))  # headers only
    with pytest.raises(DataError, match="m.png: unreadable or truncated"):
        check_sample(_sample(image, mask_path), decode=True)


def test_truncation_detected_even_if_pil_is_told_to_load_truncated(
    tmp_path: Path, data_factory, monkeypatch
) -> None:
    from PIL import ImageFile

    path = _truncate(data_factory.write_image(tmp_path / "t.png", size=(64, 64)))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
