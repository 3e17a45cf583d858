"""Every layout reader on small synthetic datasets written to tmp_path, and format detection."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from vmad.data import DATA_FORMATS, FolderConfig, MagneticTileConfig, detect_format, load_dataset, read_mask
from vmad.data.coco import rle_decode, rle_encode
from vmad.data.riad import annotations_of, semantic_mask
from vmad.errors import ConfigError, DataError


def _counts(ds, split=None) -> dict:
    return {name: c.as_dict() for name, c in ds.counts(split).items()}


# ----------------------------------------------------------------------------------------------- MVTec


def test_mvtec_root_and_class_folder(tiny_mvtec: Path) -> None:
    for path in (tiny_mvtec, tiny_mvtec / "widget"):
        ds = load_dataset(path)
        assert ds.format == "mvtec" and ds.class_names() == ["widget"] and ds.splits() == ["train", "test"]
        assert _counts(ds) == {
            "widget": {"normal": 5, "anomalous": 3, "masks": 3, "defect_types": {"dent": 1, "scratch": 2}}
        }
    assert len(ds.select(split="train")) == 3 and all(s.label == 0 for s in ds.select(split="train"))
    dent = [s for s in ds.samples if s.defect_type == "dent"][0]
    assert dent.is_anomalous and not read_mask(dent).any()  # blank mask on an anomalous image: accepted
    scratch = [s for s in ds.samples if s.defect_type == "scratch"][0]
    assert read_mask(scratch).sum() == 8 * 6


def test_mvtec_several_classes_and_wfdd_alias(tiny_mvtec: Path, data_factory) -> None:
    fx = data_factory
    fx.write_image(tiny_mvtec / "gadget" / "train" / "good" / "000.png")
    fx.write_image(tiny_mvtec / "gadget" / "test" / "good" / "000.png")
    ds = load_dataset(tiny_mvtec, format="wfdd")
    assert ds.format == "mvtec" and ds.class_names() == ["gadget", "widget"]
    assert len(ds.select("gadget")) == 2
    with pytest.raises(DataError, match="no class 'nope'"):
        ds.select("nope")


def test_mvtec_missing_mask_for_anomalous_image(tiny_mvtec: Path) -> None:
    (tiny_mvtec / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tiny_mvtec)
    assert err.value.path.name == "001.png" and "no mask" in err.value.problem


# ------------------------------------------------------------------------------------------------ VisA


def _write_visa(fx, root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for cls in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            fx.write_image(root / rel, seed=i)
            rows.append(f"{cls},{'train' if i < 2 else 'test'},normal,{rel},")
        for i in range(2):
            rel, mrel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            fx.write_image(root / rel, seed=10 + i)
            fx.write_mask(root / mrel, box=(1, 1, 5, 5), value=1)  # VisA masks hold class ids
            rows.append(f"{cls},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (root / "candle" / "image_anno.csv").write_text(
        'image,label,mask\ncandle/Data/Images/Anomaly/000.JPG,"wax missing",x\n'
    )
    return root


def test_visa_reader(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_visa(fx, tmp_path / "visa")
    ds = load_dataset(root)
    assert ds.format == "visa" and ds.class_names() == ["candle", "pcb1"]
    assert _counts(ds, "test")["candle"] == {
        "normal": 1,
        "anomalous": 2,
        "masks": 2,
        "defect_types": {"anomaly": 1, "wax missing": 1},
    }
    assert _counts(ds, "train")["pcb1"]["normal"] == 2
    anomalous = ds.select("pcb1", "test")[-1]
    assert anomalous.mask_spec == "png-nonzero" and read_mask(anomalous).sum() == 16  # value 1 counts
    single = load_dataset(root / "candle")
    assert single.format == "visa" and single.class_names() == ["candle"] and len(single) == 5


def test_visa_without_split_csv_is_an_error(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_visa(fx, tmp_path / "visa")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match="1cls.csv: VisA split file not found"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------ RIAD


def _write_riad(fx, root: Path) -> Path:
    """Two classes; class ``plate`` has train (normal + polygon defect) and test (RLE defect, and an
    anomalous image without annotation); class ``pcb`` only test."""
    categories = [{"id": i, "name": n} for i, n in enumerate(["crack", "hole", "scratch"], start=1)]
    answers = {"description": "A scratch.", "impact": "Weakens it.", "suggestion": "Reject it."}
    manifest = {
        "format": "riad",
        "version": 1,
        "classes": {
            "plate": {"normal_description": "A flat grey plate."},
            "pcb": {"normal_description": "A PCB."},
        },
    }
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(manifest))
    rle_region = np.zeros((24, 32), dtype=bool)
    rle_region[2:6, 20:30] = True
    splits = {
        ("plate", "train"): [
            ({"label": "normal", "answers": None}, []),
            (
                {"label": "anomalous", "answers": answers},
                [{"category_id": 3, "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]], "bbox": [2, 2, 10, 6]}],
            ),
        ],
        ("plate", "test"): [
            (
                {"label": "anomalous", "answers": answers},
                [
                    {"category_id": 2, "segmentation": rle_encode(rle_region), "bbox": [20, 2, 10, 4]},
                    {"category_id": 1, "segmentation": [[0, 20, 5, 20, 5, 23, 0, 23]], "bbox": [0, 20, 5, 3]},
                ],
            ),
            ({"label": "anomalous", "answers": answers}, []),
        ],
        ("pcb", "test"): [({"label": "normal"}, [])],
    }
    for (cls, split), entries in splits.items():
        images, anns = [], []
        for i, (info, regions) in enumerate(entries, start=1):
            name = f"images/{split}_{i}.png"
            fx.write_image(root / cls / name, seed=i)
            images.append({"id": i, "file_name": name, "width": 32, "height": 24, **info})
            anns += [{"id": len(anns) + 1, "image_id": i, "iscrowd": 0, **r} for r in regions]
        coco = {"images": images, "annotations": anns, "categories": categories}
        (root / cls / f"annotations_{split}.json").write_text(json.dumps(coco))
    return root


def test_riad_reader(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_riad(fx, tmp_path / "riad")
    ds = load_dataset(root)
    assert ds.format == "riad" and ds.class_names() == ["pcb", "plate"] and ds.splits() == ["train", "test"]
    assert _counts(ds)["plate"] == {
        "normal": 1,
        "anomalous": 3,
        "masks": 3,
        "defect_types": {"anomaly": 1, "crack+hole": 1, "scratch": 1},
    }
    assert ds.meta["classes"]["pcb"]["normal_description"] == "A PCB."
    train_bad = ds.select("plate", "train")[1]
    assert train_bad.answers == {
        "description": "A scratch.",
        "impact": "Weakens it.",
        "suggestion": "Reject it.",
    }
    assert train_bad.normal_description == "A flat grey plate."
    assert read_mask(train_bad)[2:8, 2:12].all() and read_mask(train_bad).sum() <= 11 * 7
    test_bad, test_blank = ds.select("plate", "test")
    sem = semantic_mask(test_bad)
    assert (sem[2:6, 20:30] == 2).all() and (sem[20:23, 0:5] == 1).all() and set(np.unique(sem)) == {0, 1, 2}
    assert [a["category_name"] for a in annotations_of(test_bad)] == ["hole", "crack"]
    assert annotations_of(test_bad)[0]["bbox"] == [20, 2, 10, 4]
    assert test_blank.is_anomalous and not read_mask(test_blank).any()
    assert not read_mask(ds.select("pcb")[0]).any()
    ds.check(decode=True)
    single = load_dataset(root / "plate")
    assert (
        single.format == "riad"
        and len(single) == 4
        and single.samples[0].normal_description == "A flat grey plate."
    )


def test_riad_errors(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_riad(fx, tmp_path / "riad")
    path = root / "plate" / "annotations_train.json"
    coco = json.loads(path.read_text())
    coco["images"][1]["answers"] = {"description": "only one"}
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotations_train.json: image 2: 'answers' needs"):
        load_dataset(root)
    coco["images"][1]["answers"] = None
    coco["images"][1]["label"] = "normal"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="labelled normal but has 1 annotations"):
        load_dataset(root)
    path.write_text("{not json")
    with pytest.raises(DataError, match="annotations_train.json: invalid JSON"):
        load_dataset(root)


def test_riad_size_mismatch_with_coco_entry(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_riad(fx, tmp_path / "riad")
    path = root / "plate" / "annotations_test.json"
    coco = json.loads(path.read_text())
    coco["images"][0]["width"] = 40
    path.write_text(json.dumps(coco))
    ds = load_dataset(root)
    with pytest.raises(DataError, match="40x24 in the annotations but .*test_1.png is 32x24"):
        ds.check()


def test_rle_roundtrip_and_uncompressed_counts() -> None:
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (5, 7), (40, 33)):
        for density in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < density
            assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    # uncompressed COCO RLE: column-major runs starting with background
    assert rle_decode({"size": [2, 2], "counts": [1, 2, 1]}).tolist() == [[False, True], [True, False]]
    # strings as pycocotools writes them (25x25 masks with a 5x5 square; runs [5, 2, 2, 2, 5] of a 4x4 mask)
    square = np.zeros((25, 25), dtype=bool)
    square[:5, :5] = True
    assert rle_encode(square)["counts"] == "05d00000000d?"
    centre = np.zeros((25, 25), dtype=bool)
    centre[5:10, 5:10] = True
    assert rle_encode(centre)["counts"] == "R45d00000000b;"
    assert np.array_equal(rle_decode({"size": [25, 25], "counts": "R45d00000000b;"}), centre)
    assert rle_decode({"size": [4, 4], "counts": "52203"})[1:3, 1:3].all()
    assert rle_decode({"size": [4, 4], "counts": "52203"}).sum() == 4


# ---------------------------------------------------------------------------------------------- folder


def test_folder_single_class_mask_mapping(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = tmp_path / "parts"
    for i in range(4):
        fx.write_image(root / "images" / f"p{i}.jpg", seed=i)
    fx.write_mask(root / "masks" / "p0_gt.png")  # defect
    fx.write_mask(root / "masks" / "p1_gt.png", box=None)  # blank: normal; p2, p3 have none: normal
    ds = load_dataset(root, options=_folder_options(mask_name="{stem}_gt.png"))
    assert ds.format == "folder" and ds.class_names() == ["parts"] and ds.splits() == ["test"]
    assert _counts(ds)["parts"] == {"normal": 3, "anomalous": 1, "masks": 1, "defect_types": {"defect": 1}}
    # with the default mapping ({stem}.png) no mask is found: everything is normal, with a warning
    from vmad.errors import DataWarning

    with pytest.warns(DataWarning, match=r"--mask-name '\{stem\}_gt.png'"):
        assert _counts(load_dataset(root))["parts"]["anomalous"] == 0


def _folder_options(**kwargs):
    from vmad.data import DataOptions

    return DataOptions(folder=FolderConfig(**kwargs))


def test_folder_class_subfolders_splits_and_defect_dirs(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = tmp_path / "shop"
    fx.write_image(root / "bolt" / "train" / "images" / "a.png")
    fx.write_image(root / "bolt" / "test" / "images" / "good" / "b.png")
    fx.write_image(root / "bolt" / "test" / "images" / "rust" / "c.png")
    fx.write_mask(root / "bolt" / "test" / "masks" / "rust" / "c.png", box=None)  # blank, label from folder
    fx.write_image(root / "nut" / "images" / "d.png")
    fx.write_mask(root / "nut" / "masks" / "d.png")
    ds = load_dataset(root)
    assert ds.format == "folder" and ds.class_names() == ["bolt", "nut"]
    assert _counts(ds)["bolt"] == {"normal": 2, "anomalous": 1, "masks": 1, "defect_types": {"rust": 1}}
    assert [s.split for s in ds.select("bolt")] == ["train", "test", "test"]
    assert _counts(ds)["nut"]["anomalous"] == 1
    (root / "bolt" / "test" / "masks" / "rust" / "c.png").unlink()
    with pytest.raises(DataError, match=r"c.png: anomalous image \(folder 'rust'\) has no mask"):
        load_dataset(root)


def test_folder_config_validation() -> None:
    with pytest.raises(ConfigError):
        FolderConfig(mask_name="{nope}.png")
    with pytest.raises(ConfigError):
        FolderConfig(default_split="holdout")


# ------------------------------------------------------------------------- real-set formats (data/formats.py)


def _write_magnetic_tile(fx, root: Path) -> Path:
    for folder, n in (("MT_Free", 6), ("MT_Crack", 3), ("MT_Uneven", 2)):
        for i in range(n):
            fx.write_image(root / folder / "Imgs" / f"exp{i}_num_{i}.jpg", mode="L", seed=i)
            blank = folder == "MT_Free" or (folder == "MT_Uneven" and i == 0)
            fx.write_mask(root / folder / "Imgs" / f"exp{i}_num_{i}.png", box=None if blank else (1, 1, 4, 4))
    return root


def test_magnetic_tile_preset_and_stable_split(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = _write_magnetic_tile(fx, tmp_path / "magnetic_tile")
    ds = load_dataset(root)
    assert ds.format == "magnetic_tile"
    assert _counts(ds)["magnetic_tile"] == {
        "normal": 6,
        "anomalous": 5,
        "masks": 5,
        "defect_types": {"Crack": 3, "Uneven": 2},
    }
    cfg = MagneticTileConfig()
    assert all(
        s.split == cfg.split_of(f"{s.image_path.parent.parent.name}/{s.image_path.stem}") for s in ds.samples
    )
    # the split depends on the file name only: the same file in another folder tree gets the same split
    other = load_dataset(_write_magnetic_tile(fx, tmp_path / "elsewhere" / "mt"))
    assert [s.split for s in other.samples] == [s.split for s in ds.samples]
    assert MagneticTileConfig(test_fraction=1.0).split_of("x") == "test"
    assert MagneticTileConfig(test_fraction=0.0).split_of("x") == "train"
    fractions = [cfg.split_of(f"MT_Free/img{i}") == "test" for i in range(2000)]
    assert 0.17 < np.mean(fractions) < 0.23


def test_mpdd_preset_labels_by_mask_content(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = tmp_path / "mpdd_plate"
    for split, blank in (("train", True), ("train", False), ("val", True), ("test", False)):
        name = f"{split}_{int(blank)}.png"
        fx.write_image(root / split / "images" / name)
        fx.write_mask(root / split / "masks" / name, box=None if blank else (2, 2, 6, 6))
    ds = load_dataset(root)
    assert ds.format == "mpdd" and ds.splits() == ["train", "val", "test"]
    assert _counts(ds)["mpdd_plate"] == {
        "normal": 2,
        "anomalous": 2,
        "masks": 2,
        "defect_types": {"defect": 2},
    }
    assert _counts(ds, "val")["mpdd_plate"]["normal"] == 1


def test_neu_seg_preset(tmp_path: Path, data_factory) -> None:
    fx = data_factory
    root = tmp_path / "neu"
    for folder, ids in (("training", (1, 3)), ("test", (2,))):
        for i, cid in enumerate(ids):
            fx.write_image(root / "images" / folder / f"{i:06d}.jpg", mode="L")
            fx.write_mask(root / "annotations" / folder / f"{i:06d}.png", value=cid)
    ds = load_dataset(root)
    assert ds.format == "neu_seg" and ds.splits() == ["train", "test"]
    assert _counts(ds)["neu"] == {
        "normal": 0,
        "anomalous": 3,
        "masks": 3,
        "defect_types": {"inclusion": 1, "patches": 1, "scratches": 1},
    }
    assert all(read_mask(s).sum() == 8 * 6 for s in ds.samples)


# ------------------------------------------------------------------------------------------- detection


def test_detection_errors(tmp_path: Path, tiny_mvtec: Path, data_factory) -> None:
    fx = data_factory
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty folder"):
        load_dataset(tmp_path / "empty")
    fx.write_image(tmp_path / "loose" / "x.png")
    with pytest.raises(DataError, match="unrecognised dataset layout; pass --format"):
        detect_format(tmp_path / "loose")
    # a folder that looks like MVTec and like VisA at once
    both = tiny_mvtec / "widget"
    (both / "split_csv").mkdir()
    (both / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    with pytest.raises(DataError, match=r"several formats \(mvtec, visa\); pass --format"):
        load_dataset(both)
    assert load_dataset(both, format="mvtec").format == "mvtec"
    with pytest.raises(DataError, match="unknown format"):
        load_dataset(both, format="coco")


def test_parent_of_several_datasets_is_not_read_as_folder(
    tmp_path: Path, tiny_mvtec: Path, data_factory
) -> None:
    fx = data_factory
    _write_magnetic_tile(fx, tmp_path / "magnetic_tile")
    with pytest.raises(DataError, match="holds several datasets"):
        load_dataset(tmp_path)
    assert set(DATA_FORMATS) == {"mvtec", "visa", "riad", "folder", "magnetic_tile", "mpdd", "neu_seg"}


def test_folder_warns_when_no_mask_matches_and_suggests_the_template(tmp_path: Path, data_factory) -> None:
    from vmad.data.dataset import data_options
    from vmad.errors import DataWarning

    root = tmp_path / "caps"
    for name in ("x", "y"):
        data_factory.write_image(root / "images" / f"{name}.png")
        data_factory.write_mask(root / "masks" / f"{name}_mask.png")
    with pytest.warns(DataWarning, match=r"none is named '\{stem\}.png'.*--mask-name '\{stem\}_mask.png'"):
        ds = load_dataset(root)
    assert _counts(ds)["caps"]["anomalous"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right template: no warning, both anomalous
        ds = load_dataset(root, options=data_options("{stem}_mask.png"))
    assert _counts(ds)["caps"]["anomalous"] == 2
    # matched but blank masks (e.g. MPDD's normal images) are no mistake: no warning
    for name in ("x", "y"):
        data_factory.write_mask(root / "masks" / f"{name}.png", box=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _counts(load_dataset(root))["caps"]["anomalous"] == 0


def test_data_options_from_command_line_pairs() -> None:
    from vmad.data.dataset import data_options

    opts = data_options("{stem}_m.png", ["folder.masks_dir=gt", "folder.normal_dirs=ok,fine",
                                         "magnetic_tile.test_fraction=0.5"])
    assert (opts.folder.mask_name, opts.folder.masks_dir, opts.folder.normal_dirs) == (
        "{stem}_m.png", "gt", ("ok", "fine"))
    assert opts.magnetic_tile.test_fraction == 0.5 and data_options() == data_options(None, [])
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        data_options(None, ["mask_name=x"])
    with pytest.raises(ConfigError, match="unknown data options.folder keys"):
        data_options(None, ["folder.nope=1"])
    assert FolderConfig().plain_split == "test" and FolderConfig(default_split="train").plain_split == "train"
