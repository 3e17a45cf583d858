"""Procedural defect-free images: determinism, variety, object-on-background shape, folder layout, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmad.cli import main
from vmad.data.build_riad import BuildConfig, build_riad, seeded_rng
from vmad.data.dataset import load_dataset
from vmad.data.io import read_image
from vmad.data.procedural import (
    CLASSES,
    TEXTURES,
    ProceduralConfig,
    part_image,
    surface_image,
    texture,
    write_procedural,
)
from vmad.data.synth import estimate_foreground, is_grey
from vmad.errors import ConfigError, DataError


@pytest.mark.parametrize("kind", TEXTURES)
def test_each_texture_spans_the_range_and_is_not_flat(kind: str) -> None:
    t = texture(np.random.default_rng(3), 64, kind)
    assert t.shape == (64, 64) and t.min() >= 0.0 and t.max() <= 1.0
    assert t.max() - t.min() > 0.9 and t.std() > 0.1
    again = texture(np.random.default_rng(3), 64, kind)
    assert np.array_equal(t, again)


def test_unknown_texture_and_bad_config() -> None:
    with pytest.raises(ConfigError, match="texture kind"):
        texture(np.random.default_rng(0), 32, "plaid")
    with pytest.raises(ConfigError, match="count"):
        ProceduralConfig(count=0)
    with pytest.raises(ConfigError, match="part_scale"):
        ProceduralConfig(part_scale=(0.9, 0.5))


def test_parts_sit_on_a_uniform_background_and_grey_stays_grey() -> None:
    cfg = ProceduralConfig(size=96)
    greys = 0
    for i in range(12):
        part = part_image(seeded_rng(0, "part", i), cfg)
        surface = surface_image(seeded_rng(0, "surface", i), cfg)
        assert part.shape == surface.shape == (96, 96, 3) and part.dtype == np.uint8
        fg = estimate_foreground(part)  # the synthetic-defect painter must find the object
        assert fg is not None and 0.1 <= fg.mean() <= 0.9
        assert estimate_foreground(surface) is None  # a texture fills the frame: no object found
        greys += is_grey(part) + is_grey(surface)
    assert 0 < greys < 24  # both grey and colour images are drawn


def test_write_is_deterministic_folder_format_and_refuses_overwrite(tmp_path: Path) -> None:
    cfg = ProceduralConfig(count=3, size=48, seed=5)
    a, b = write_procedural(tmp_path / "a", cfg), write_procedural(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert [str(f) for f in files] == [
        f"{c}/train/images/{i:05d}.png" for c in sorted(CLASSES) for i in range(3)
    ]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = write_procedural(tmp_path / "c", ProceduralConfig(count=3, size=48, seed=6))
    assert (a / files[0]).read_bytes() != (other / files[0]).read_bytes()
    ds = load_dataset(a)
    assert ds.format == "folder" and sorted(ds.class_names()) == sorted(CLASSES)
    assert all(s.label == 0 and s.split == "train" for s in ds.samples)
    assert read_image(a / files[0]).shape == (48, 48, 3)
    with pytest.raises(DataError, match="not empty"):
        write_procedural(a, cfg)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_build_riad_paints_defects_on_procedural_images(tmp_path: Path) -> None:
    src = write_procedural(tmp_path / "proc", ProceduralConfig(count=2, size=64))
    summary = build_riad(src, tmp_path / "riad", BuildConfig(synthetic_per_normal=1))
    ds = load_dataset(tmp_path / "riad")
    assert ds.format == "riad" and sorted(ds.class_names()) == sorted(CLASSES)
    anomalous = [s for s in ds.samples if s.label == 1]
    assert len(anomalous) == 4 and len(ds.samples) == 8 and summary.out == tmp_path / "riad"


def test_cli_make_procedural(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p"
    rc = main(["data", "make-procedural", "--out", str(out), "--count", "2", "--size", "40", "--quiet"])
    assert rc == 0 and "2 images of 40x40 px per class" in capsys.readouterr().out
    assert len(list(out.rglob("*.png"))) == 2 * len(CLASSES)
    rc = main(["data", "make-procedural", "--out", str(out), "--count", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "not empty" in err
