"""Acceptance counts on the real sets in ../shared/data (skipped where that folder is absent)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from vmad.cli import main
from vmad.data import load_dataset, read_image, read_mask

pytestmark = pytest.mark.realdata


@lru_cache(maxsize=8)
def _load(path: Path):
    return load_dataset(path)


EXPECTED = {
    "mvtec_ad/bottle": (
        "mvtec",
        "bottle",
        {
            "normal": 20,
            "anomalous": 63,
            "masks": 63,
            "defect_types": {"broken_large": 20, "broken_small": 22, "contamination": 21},
        },
    ),
    "magnetic_tile": (
        "magnetic_tile",
        "magnetic_tile",
        {
            "normal": 952,
            "anomalous": 392,
            "masks": 392,
            "defect_types": {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103},
        },
    ),
    "mpdd_metal_plate": (
        "mpdd",
        "mpdd_metal_plate",
        {"normal": 80, "anomalous": 81, "masks": 81, "defect_types": {"defect": 81}},
    ),
}


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_inspect_json_counts(shared_data: Path, capsys, rel: str) -> None:
    fmt, name, counts = EXPECTED[rel]
    assert main(["data", "inspect", str(shared_data / rel), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"format": fmt, "classes": {name: counts}}


def test_neu_seg_counts(shared_data: Path, capsys) -> None:
    assert main(["data", "inspect", str(shared_data / "neu_seg"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    c = out["classes"]["neu_seg"]
    assert out["format"] == "neu_seg" and (c["normal"], c["anomalous"], c["masks"]) == (0, 4470, 4470)
    assert sum(c["defect_types"].values()) == 4470
    ds = _load(shared_data / "neu_seg")
    assert len(ds.select(split="train")) == 3630 and len(ds.select(split="test")) == 840


def test_mvtec_root_with_class_folders(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "mvtec_ad")
    assert ds.format == "mvtec" and ds.class_names() == ["bottle"] and ds.splits() == ["test"]


def test_splits_of_real_sets(shared_data: Path) -> None:
    mt = _load(shared_data / "magnetic_tile")
    test = mt.counts("test")["magnetic_tile"]
    assert (test.normal, test.anomalous) == (197, 80)  # the fixed hash split (docs/data_formats.md)
    mpdd = load_dataset(shared_data / "mpdd_metal_plate")
    assert [len(mpdd.select(split=s)) for s in ("train", "val", "test")] == [94, 20, 47]


def test_real_masks_and_grayscale_images(shared_data: Path) -> None:
    mt = _load(shared_data / "magnetic_tile")
    blank = [s for s in mt.samples if s.defect_type == "Uneven" and not read_mask(s).any()]
    assert len(blank) == 4  # anomalous images with blank masks are kept
    sample = next(s for s in mt.samples if s.defect_type == "Crack")
    image, mask = read_image(sample.image_path), read_mask(sample)
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == mask.shape and mask.any()
    neu = _load(shared_data / "neu_seg").samples[0]
    assert read_mask(neu).any() and read_image(neu.image_path).shape == (200, 200, 3)


def test_parent_folder_is_not_a_dataset(shared_data: Path, capsys) -> None:
    assert main(["data", "inspect", str(shared_data)]) != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds several datasets" in err
