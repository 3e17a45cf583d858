"""`vmad data build-riad`: the output reads back as RIAD, masks are exact, builds are deterministic and
atomic, and sources of every kind (binary masks, semantic masks, RIAD itself, the real sets) work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmad.cli import main
from vmad.data import load_dataset, read_image, read_mask
from vmad.data.build_riad import BuildConfig, build_riad, select_samples
from vmad.data.coco import rasterize
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.data.riad import annotations_of, semantic_mask
from vmad.data.text import CATEGORIES_BY_NAME, SYNTHETIC_CATEGORY
from vmad.errors import DataError


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _build(capsys, source: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return _cli(capsys, "data", "build-riad", "--from", str(source), "--out", str(out), "--quiet", *extra)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(class_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(class_dir.glob("annotations_*.json")):
        for im in json.loads(f.read_text())["images"]:
            out[im["file_name"]] = im
    return out


def test_build_reads_back_as_riad_with_real_and_synthetic(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "riad"
    rc, stdout, err = _build(capsys, tiny_mvtec, out, "--synthetic-per-normal", "2")
    assert rc == 0 and err == ""
    assert "widget: 5 normal, 3 real anomalous, 10 synthetic" in stdout
    rc, stdout, _ = _cli(capsys, "data", "inspect", str(out), "--json", "--verify")
    assert rc == 0
    report = json.loads(stdout)
    assert report["format"] == "riad"
    widget = report["classes"]["widget"]
    assert (widget["normal"], widget["anomalous"], widget["masks"]) == (5, 13, 13)
    types = widget["defect_types"]
    assert types["scratch"] == 2 and types["dent"] == 1
    assert sum(n for t, n in types.items() if t.startswith("synthetic_")) == 10
    assert len([t for t in types if t.startswith("synthetic_")]) == 6  # every kind, round-robin

    manifest = json.loads((out / "classes.json").read_text())
    assert manifest["format"] == "riad" and manifest["version"] == 1
    assert "widget" in manifest["classes"]["widget"]["normal_description"]
    assert sorted(p.name for p in (out / "widget").glob("annotations_*.json")) == [
        "annotations_test.json",
        "annotations_train.json",
    ]
    categories = json.loads((out / "widget" / "annotations_test.json").read_text())["categories"]
    assert [c["id"] for c in categories] == list(range(1, 16))


def test_masks_are_exact_and_text_is_present(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "riad"
    assert _build(capsys, tiny_mvtec, out, "--synthetic-per-normal", "2")[0] == 0
    dataset = load_dataset(out)
    source = {
        str(s.image_path.relative_to(tiny_mvtec / "widget")): s for s in load_dataset(tiny_mvtec).samples
    }
    entries = _entries(out / "widget")
    n_synth = 0
    for sample in dataset.samples:
        entry = entries[str(sample.image_path.relative_to(out / "widget"))]
        assert set(sample.answers) == {"description", "impact", "suggestion"}
        assert sample.split == source[entry["source"]].split  # the source split is kept
        if "synthetic" in entry:
            n_synth += 1
            base = read_image(out / "widget" / entry["synthetic"]["base"])
            changed = (read_image(sample.image_path) != base).any(axis=2)
            np.testing.assert_array_equal(read_mask(sample), changed)
            kind = entry["synthetic"]["kind"]
            ids = np.unique(semantic_mask(sample))
            assert ids.tolist() == [0, CATEGORIES_BY_NAME[SYNTHETIC_CATEGORY[kind]].id]
            union = np.zeros(changed.shape, bool)
            for ann in annotations_of(sample):  # one box per region, tight around it
                region = rasterize([ann], *changed.shape) != 0
                ys, xs = np.nonzero(region)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert ann["area"] == region.sum() and not (union & region).any()
                union |= region
            np.testing.assert_array_equal(union, changed)
        elif sample.is_anomalous:
            np.testing.assert_array_equal(read_mask(sample), read_mask(source[entry["source"]]))
            assert (out / "widget" / entry["file_name"]).read_bytes() == source[
                entry["source"]
            ].image_path.read_bytes()
            if read_mask(sample).any():
                assert "scratch" in sample.answers["description"]
                assert {a["category_id"] for a in annotations_of(sample)} == {
                    CATEGORIES_BY_NAME["scratch"].id
                }
        else:
            assert "No defect" in sample.answers["description"]
    assert n_synth == 10


def test_deterministic_for_a_seed(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert (
            _build(capsys, tiny_mvtec, tmp_path / name, "--seed", seed, "--synthetic-per-normal", "2")[0] == 0
        )
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a != c  # another seed: other synthetic defects


def test_atomic_refuse_and_overwrite(capsys, tiny_mvtec: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "riad"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, stdout, err = _build(capsys, tiny_mvtec, out)
    assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "--overwrite" in err and (out / "keep.txt").exists()

    assert _build(capsys, tiny_mvtec, out, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "classes.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["riad", "tiny_mvtec"]  # no temporary left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build(capsys, tiny_mvtec, empty)[0] == 0 and (empty / "classes.json").is_file()

    import vmad.data.build_riad as builder

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(builder, "synthesize", boom)
    with pytest.raises(RuntimeError):
        build_riad(tiny_mvtec, tmp_path / "failed")
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("case", ["missing", "file", "inside", "badsplit"])
def test_bad_source_is_one_error_line(capsys, tiny_mvtec: Path, tmp_path: Path, case: str) -> None:
    source, out, extra = tiny_mvtec, tmp_path / "riad", ()
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "file":
        source = tmp_path / "file.txt"
        source.write_text("x")
    elif case == "inside":
        out = tiny_mvtec / "riad"
    else:
        extra = ("--split", "val")
    rc, stdout, err = _build(capsys, source, out, *extra)
    assert rc == 2 and stdout == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_split_and_max_images(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "test_only"
    assert _build(capsys, tiny_mvtec, out, "--split", "test", "--synthetic-per-normal", "0")[0] == 0
    counts = load_dataset(out).counts()["widget"]
    assert (counts.normal, counts.anomalous) == (2, 3)
    assert {s.split for s in load_dataset(out).samples} == {"test"}

    out = tmp_path / "capped"
    assert _build(capsys, tiny_mvtec, out, "--max-images", "4", "--synthetic-per-normal", "1")[0] == 0
    samples = load_dataset(out).samples
    real = [s for s in samples if not s.defect_type.startswith("synthetic_")]
    assert len(real) == 4
    assert any(s.label == NORMAL for s in real) and any(s.label == ANOMALOUS for s in real)
    assert len(samples) - len(real) == sum(s.label == NORMAL for s in real)


def test_select_samples_mix_and_determinism(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / f"n{i}.png", "c", NORMAL, "good", "train") for i in range(90)]
    for t in ("a", "b", "c"):
        samples += [Sample(tmp_path / f"{t}{i}.png", "c", ANOMALOUS, t, "test") for i in range(10)]
    chosen = select_samples(samples, 20, seed=0, root=tmp_path)
    assert len(chosen) == 20 and chosen == select_samples(samples, 20, seed=0, root=tmp_path)
    anomalous = [s for s in chosen if s.is_anomalous]
    assert len(anomalous) == 5  # 25 % of 20
    assert {s.defect_type for s in anomalous} == {"a", "b", "c"}
    assert chosen != select_samples(samples, 20, seed=1, root=tmp_path)
    few = select_samples(samples[:89] + samples[-1:], 2, seed=0, root=tmp_path)
    assert sorted(s.label for s in few) == [NORMAL, ANOMALOUS]
    assert select_samples(samples, None, 0, tmp_path) == samples


def test_semantic_source_keeps_defect_categories(capsys, tmp_path: Path) -> None:
    """NEU-Seg layout: class-id masks become one category per id (1 inclusion, 3 scratches)."""
    root = tmp_path / "neu"
    for split in ("training", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            root / "images" / split / "a.jpg"
        )
        ids = np.zeros((40, 40), np.uint8)
        ids[2:10, 2:12] = 1
        ids[25:38, 30:33] = 3
        Image.fromarray(ids).save(root / "annotations" / split / "a.png")
    out = tmp_path / "riad"
    assert _build(capsys, root, out)[0] == 0
    samples = load_dataset(out).samples
    assert len(samples) == 2 and all(s.defect_type == "inclusion+scratches" for s in samples)
    sem = semantic_mask(samples[0])
    assert (sem[2:10, 2:12] == CATEGORIES_BY_NAME["inclusion"].id).all()
    assert (sem[25:38, 30:33] == CATEGORIES_BY_NAME["scratch"].id).all()
    assert int((sem != 0).sum()) == 80 + 39


def test_riad_source_round_trip(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert _build(capsys, tiny_mvtec, first, "--synthetic-per-normal", "1")[0] == 0
    assert _build(capsys, first, second, "--synthetic-per-normal", "0")[0] == 0
    a = {s.image_path.relative_to(first / "widget"): s for s in load_dataset(first).samples}
    b = load_dataset(second).samples
    assert len(b) == len(a)
    manifest = lambda p: json.loads((p / "classes.json").read_text())["classes"]  # noqa: E731
    assert manifest(first) == manifest(second)
    entries = _entries(second / "widget")
    for s in b:
        original = a[Path(entries[str(s.image_path.relative_to(second / "widget"))]["source"])]
        assert s.answers == original.answers and s.defect_type == original.defect_type
        np.testing.assert_array_equal(semantic_mask(s), semantic_mask(original))


def test_config_validation() -> None:
    from vmad.errors import ConfigError

    with pytest.raises(ConfigError):
        BuildConfig(synthetic_per_normal=-1)
    with pytest.raises(ConfigError):
        BuildConfig(max_images=0)


@pytest.mark.realdata
def test_magnetic_tile_acceptance_small(capsys, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "riad_mt"
    rc, stdout, _ = _build(
        capsys, shared_data / "magnetic_tile", out, "--synthetic-per-normal", "1", "--max-images", "12"
    )
    assert rc == 0
    rc, stdout, _ = _cli(capsys, "data", "inspect", str(out), "--json")
    report = json.loads(stdout)
    assert report["format"] == "riad"
    c = report["classes"]["magnetic_tile"]
    real = {t: n for t, n in c["defect_types"].items() if not t.startswith("synthetic_")}
    synthetic = {t: n for t, n in c["defect_types"].items() if t.startswith("synthetic_")}
    assert sum(real.values()) >= 1 and sum(synthetic.values()) == c["normal"] >= 1
    assert c["normal"] + sum(real.values()) == 12
    source = {
        str(s.image_path.relative_to(shared_data / "magnetic_tile")): s
        for s in load_dataset(shared_data / "magnetic_tile").samples
    }
    entries = _entries(out / "magnetic_tile")
    for s in load_dataset(out).samples:
        entry = entries[str(s.image_path.relative_to(out / "magnetic_tile"))]
        if s.is_anomalous and "synthetic" not in entry:
            np.testing.assert_array_equal(read_mask(s), read_mask(source[entry["source"]]))


# ------------------------------------------------------------------------------------ several sources


def _neu_source(root: Path) -> Path:
    """A NEU-Seg-layout source (class = the folder's name): one 40x40 image per split, class ids 1 and 3."""
    for split in ("training", "test"):
        rng = np.random.default_rng(len(split))
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        image = rng.integers(0, 255, (40, 40), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / split / "a.jpg")
        ids = np.zeros((40, 40), np.uint8)
        ids[2:10, 2:12] = 1
        ids[25:38, 30:33] = 3
        Image.fromarray(ids).save(root / "annotations" / split / "a.png")
    return root


def test_two_sources_merge_into_one_root(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    neu = _neu_source(tmp_path / "neu")
    both = tmp_path / "both"
    rc, stdout, err = _cli(
        capsys, "data", "build-riad", "--from", str(tiny_mvtec), "--from", str(neu), "--out", str(both),
        "--quiet", "--synthetic-per-normal", "2",
    )  # fmt: skip
    assert rc == 0 and err == ""
    assert "from 2 sources" in stdout and "widget: 5 normal" in stdout and "neu: 0 normal" in stdout
    rc, stdout, _ = _cli(capsys, "data", "inspect", str(both), "--json", "--verify")
    assert rc == 0 and sorted(json.loads(stdout)["classes"]) == ["neu", "widget"]

    manifest = json.loads((both / "classes.json").read_text())
    assert sorted(manifest["classes"]) == ["neu", "widget"]
    assert manifest["builder"]["source_format"] == "mvtec+neu_seg"
    assert manifest["builder"]["sources"] == [
        {"path": tiny_mvtec.as_posix(), "format": "mvtec", "classes": ["widget"]},
        {"path": neu.as_posix(), "format": "neu_seg", "classes": ["neu"]},
    ]
    # Each class folder is byte-identical to the one a single-source build writes (sources do not interact).
    for source, name in ((tiny_mvtec, "widget"), (neu, "neu")):
        alone = tmp_path / f"alone_{name}"
        assert _build(capsys, source, alone, "--synthetic-per-normal", "2")[0] == 0
        assert _files(alone / name) == _files(both / name)
        single = json.loads((alone / "classes.json").read_text())
        assert single["classes"][name] == manifest["classes"][name]
        sources = manifest["builder"]["sources"]
        assert single["builder"]["sources"] == [s for s in sources if s["classes"] == [name]]

    # The Python API takes a list of paths and per-source formats; same bytes as the CLI build.
    again = tmp_path / "again"
    cfg = BuildConfig(synthetic_per_normal=2)
    summary = build_riad([tiny_mvtec, neu], again, cfg, formats=["mvtec", None])
    assert [(s.format, s.classes) for s in summary.sources] == [("mvtec", ["widget"]), ("neu_seg", ["neu"])]
    assert _files(again) == _files(both)


def test_two_sources_deterministic_for_a_seed(capsys, tiny_mvtec: Path, tmp_path: Path) -> None:
    neu = _neu_source(tmp_path / "neu")
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        rc, _, _ = _cli(
            capsys, "data", "build-riad", "--from", str(tiny_mvtec), "--from", str(neu), "--out",
            str(tmp_path / name), "--quiet", "--seed", seed, "--format", "mvtec", "--format", "auto",
        )  # fmt: skip
        assert rc == 0
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and a != c


@pytest.mark.parametrize("case", ["clash", "formats"])
def test_two_sources_errors_are_one_line(
    capsys, tiny_mvtec: Path, tmp_path: Path, data_factory, case: str
) -> None:
    other = tmp_path / "other_mvtec"  # a second MVTec root that also has a class `widget`
    for i in range(2):
        data_factory.write_image(other / "widget" / "train" / "good" / f"{i:03d}.png", seed=50 + i)
        data_factory.write_image(other / "widget" / "test" / "good" / f"{i:03d}.png", seed=60 + i)
    data_factory.write_image(other / "gizmo" / "train" / "good" / "000.png", seed=70)
    data_factory.write_image(other / "gizmo" / "test" / "good" / "000.png", seed=71)
    out = tmp_path / "riad"
    extra = ("--format", "mvtec", "--format", "mvtec", "--format", "mvtec") if case == "formats" else ()
    rc, stdout, err = _cli(
        capsys, "data", "build-riad", "--from", str(tiny_mvtec), "--from", str(other), "--out", str(out),
        "--quiet", *extra,
    )  # fmt: skip
    assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    if case == "clash":
        assert "'widget'" in err and str(tiny_mvtec) in err and str(other) in err
    else:
        assert "--format given 3 times for 2 --from sources" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(DataError, match="class 'widget' is also in source"):
        build_riad([tiny_mvtec, other], out)
