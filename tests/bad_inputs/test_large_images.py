"""The image-size guard (issue 15 item 3): images above ``max_pixels`` are decoded and processed at a
reduced size, their mask comes back at the input size, summary.json records it; smaller images are
processed exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.data.io import read_image, read_image_bounded, reduction_factor
from vmad.infer.detector import Detector, DetectorConfig
from vmad_testing import save_random_image


def _detect(*argv: str) -> int:
    return main(["detect", *argv, "--max-new-tokens", "4", "--no-progress"])


def test_reduction_factor_bounds_the_pixel_count() -> None:
    assert reduction_factor(100, 100, 10_000) == 1 and reduction_factor(100, 100, None) == 1
    for h, w, limit in ((12000, 12000, 2048 * 2048), (101, 37, 500), (2049, 2049, 2048 * 2048), (5, 7, 1)):
        f = reduction_factor(h, w, limit)
        assert -(-h // f) * -(-w // f) <= limit
        assert f == 1 or -(-h // (f - 1)) * -(-w // (f - 1)) > limit


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_large_file_is_decoded_at_a_bounded_size(tmp_path, ext, monkeypatch) -> None:
    path = save_random_image(tmp_path / f"big.{ext}", (120, 160, 3), 3)
    loads: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy(self):  # the size the decoder produces (JPEG: after draft)
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    pixels, size = read_image_bounded(path, 1000)
    assert size == (120, 160)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    assert pixels.shape[0] * pixels.shape[1] <= 1000
    if ext == "jpg":  # draft mode: the JPEG decoder itself ran at a reduced scale
        assert loads and max(w * h for w, h in loads) < 160 * 120
    monkeypatch.undo()
    small, same = read_image_bounded(path, 160 * 120)  # at the limit: exactly read_image
    assert same == (120, 160) and np.array_equal(small, read_image(path))


def test_detector_mask_at_input_size_probability_map_reduced(tiny_model) -> None:
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    det = Detector(tiny_model, DetectorConfig(max_pixels=1000))
    [d] = det.detect(image, answer=False)
    assert d.downscaled and d.mask.shape == (90, 120) and d.size == (90, 120)
    h, w = d.processed_size
    assert h * w <= 1000 and d.probability_map.shape == (h, w) and d.processed_mask.shape == (h, w)
    assert d.full_probability_map().shape == (90, 120)
    assert np.array_equal(d.mask, d.full_probability_map() > det.config.threshold)
    s = d.summary()
    assert s["downscaled"] is True and s["processed_size"] == [h, w]
    assert (s["height"], s["width"]) == (90, 120)
    assert isinstance(d.mask_description, str)


def test_image_below_the_limit_is_unchanged(tiny_model, tmp_path) -> None:
    path = save_random_image(tmp_path / "small.png", (40, 56, 3), 5)
    limited = Detector(tiny_model, DetectorConfig(max_pixels=40 * 56))
    unlimited = Detector(tiny_model, DetectorConfig(max_pixels=10**12))
    for src in (path, read_image(path)):
        [a] = limited.detect(src, answer=False)
        [b] = unlimited.detect(src, answer=False)
        assert not a.downscaled and a.processed_size is None
        assert a.anomaly_score == b.anomaly_score
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.probability_map, b.probability_map)


def test_cli_large_image_mask_at_original_size_and_summary_records_it(tiny_ckpt, tmp_path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    save_random_image(root / "big.png", (100, 140, 3), 1)
    save_random_image(root / "small.png", (20, 30, 3), 2)
    out = tmp_path / "out"
    rc = _detect(str(root), "--model", str(tiny_ckpt), "--out", str(out), "--no-answer",
                 "--max-pixels", "2000")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_pixels"] == 2000
    rows = {Path(r["file"]).name: r for r in summary["images"]}
    big, small = rows["big.png"], rows["small.png"]
    assert big["downscaled"] is True and big["processed_size"][0] * big["processed_size"][1] <= 2000
    assert (big["height"], big["width"]) == (100, 140)
    big_mask = np.array(Image.open(out / big["mask"]))
    assert big_mask.shape == (100, 140) and set(np.unique(big_mask)) <= {0, 255}
    assert big["mask_pixels"] == int((big_mask == 255).sum())
    assert np.array(Image.open(out / big["overlay"])).shape == (100, 140, 3)
    assert small["downscaled"] is False and small["processed_size"] is None

    out2 = tmp_path / "out2"  # the small image's outputs do not depend on the limit
    assert _detect(str(root / "small.png"), "--model", str(tiny_ckpt), "--out", str(out2), "--no-answer") == 0
    [row2] = json.loads((out2 / "summary.json").read_text())["images"]
    assert row2["score"] == small["score"] and row2["mask_pixels"] == small["mask_pixels"]
    for key in ("mask", "overlay"):
        assert np.array_equal(np.array(Image.open(out / small[key])), np.array(Image.open(out2 / row2[key])))


def test_streamed_png_matches_the_array(tmp_path) -> None:
    from vmad.cli.detect import _mask_strips, _upsampled_strips, write_png_strips

    rng = np.random.default_rng(7)
    mask = rng.random((1100, 37)) > 0.5
    write_png_strips(tmp_path / "m.png", _mask_strips(mask))
    assert np.array_equal(np.array(Image.open(tmp_path / "m.png")), mask.astype(np.uint8) * 255)
    small = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    write_png_strips(tmp_path / "o.png", _upsampled_strips(small, (1030, 70)))
    whole = np.array(Image.fromarray(small).resize((70, 1030), Image.Resampling.BILINEAR))
    got = np.array(Image.open(tmp_path / "o.png"))
    assert got.shape == (1030, 70, 3) and np.abs(got.astype(int) - whole).max() <= 1


def test_max_pixels_must_be_positive() -> None:
    from vmad.errors import ConfigError

    with pytest.raises(ConfigError, match="max_pixels"):
        DetectorConfig(max_pixels=0).validate()
