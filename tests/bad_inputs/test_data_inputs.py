"""Issue 15, data layer: bad input never escapes the dataset / output folder, never crashes with a
traceback, never loses work. Each case gives one clean ``VMADError`` (CLI: one ``error:`` line, exit 2) or
a valid result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vmad
from vmad.cli import main
from vmad.data import check_sample, load_dataset, read_image, read_mask
from vmad.data.coco import _counts_to_rle_string, load_coco, rasterize, rle_decode, rle_encode
from vmad.errors import DataError, VMADError

CLS = "widget"
W, H = 32, 24


def _png(path: Path, size: tuple[int, int] = (W, H), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _answers() -> dict:
    return {"description": "A scratch.", "impact": "Weakens it.", "suggestion": "Reject it."}


def _riad(
    root: Path,
    images: list[dict] | None = None,
    annotations: list[dict] | None = None,
    classes: dict | None = None,
    manifest_extra: dict | None = None,
    write_files: bool = True,
) -> Path:
    """A one-class RIAD root: ``widget/images/000.png`` (normal) and ``001.png`` (anomalous) by default."""
    cls = root / CLS
    if images is None:
        images = [
            {"id": 1, "file_name": "images/000.png", "width": W, "height": H, "label": "normal"},
            {
                "id": 2,
                "file_name": "images/001.png",
                "width": W,
                "height": H,
                "label": "anomalous",
                "answers": _answers(),
            },
        ]
    if annotations is None:
        mask = np.zeros((H, W), dtype=bool)
        mask[3:9, 4:12] = True
        annotations = [
            {"id": 1, "image_id": 2, "category_id": 1, "segmentation": rle_encode(mask), "bbox": [4, 3, 8, 6]}
        ]
    if write_files:
        for i in range(2):
            _png(cls / "images" / f"{i:03d}.png", seed=i)
    cls.mkdir(parents=True, exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "scratch"}]}
    (cls / "annotations_test.json").write_text(json.dumps(coco))
    manifest = {"format": "riad", "version": 1, "classes": classes or {CLS: {"normal_description": "ok"}}}
    manifest.update(manifest_extra or {})
    (root / "classes.json").write_text(json.dumps(manifest))
    return root


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    _, err = capsys.readouterr()
    return rc, err


def _one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def _touch_all(path: Path) -> None:
    """Load a dataset and read every image and mask (what inspect --verify and training do)."""
    for sample in load_dataset(path).samples:
        check_sample(sample, decode=True)
        read_mask(sample)


# ------------------------------------------------------------------------------ 1. paths leave the root


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "dotdot_inside_name"])
def test_image_path_outside_the_dataset_is_refused(tmp_path: Path, case: str) -> None:
    outside = _png(tmp_path / "secret.png")
    root = tmp_path / "data" / "riad"
    _riad(root)
    name = {
        "dotdot": "../../../secret.png",
        "absolute": str(outside),
        "symlink": "images/link.png",
        "dotdot_inside_name": "images/../../../../secret.png",
    }[case]
    if case == "symlink":
        (root / CLS / "images" / "link.png").symlink_to(outside)
    coco = json.loads((root / CLS / "annotations_test.json").read_text())
    coco["images"][0]["file_name"] = name
    (root / CLS / "annotations_test.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="leaves the dataset folder|is absolute"):
        load_dataset(root)


@pytest.mark.parametrize("case", ["dotdot", "absolute"])
def test_class_name_outside_the_dataset_is_refused(tmp_path: Path, case: str) -> None:
    elsewhere = _riad(tmp_path / "elsewhere")  # a valid class folder outside the dataset root
    root = tmp_path / "data"
    _riad(root)
    name = "../elsewhere/widget" if case == "dotdot" else str(elsewhere / CLS)
    manifest = json.loads((root / "classes.json").read_text())
    manifest["classes"] = {name: {"normal_description": "x"}}
    (root / "classes.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="classes.json: class"):
        load_dataset(root, "riad")


@pytest.mark.parametrize("case", ["image", "mask"])
def test_visa_csv_path_outside_the_root_is_refused(tmp_path: Path, case: str) -> None:
    root = tmp_path / "visa"
    _png(root / "candle" / "Data" / "Images" / "Anomaly" / "000.png")
    (root / "candle" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "candle/Data/Masks/Anomaly/000.png")
    _png(tmp_path / "secret.png")
    image, mask = "candle/Data/Images/Anomaly/000.png", "candle/Data/Masks/Anomaly/000.png"
    if case == "image":
        image = "../secret.png"
    else:
        mask = "../secret.png"
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        f"object,split,label,image,mask\ncandle,test,anomaly,{image},{mask}\n"
    )
    with pytest.raises(DataError, match="leaves the dataset folder"):
        load_dataset(root, "visa")


def test_build_riad_never_writes_outside_out(tmp_path: Path, capsys) -> None:
    """The issue's case: ``file_name`` with ``../`` segments made build-riad write beside (not in) --out."""
    src = tmp_path / "a" / "b" / "c" / "src"
    _riad(src)
    _png(tmp_path / "x.png", seed=5)
    coco = json.loads((src / CLS / "annotations_test.json").read_text())
    coco["images"][0]["file_name"] = "../../../../../x.png"
    (src / CLS / "annotations_test.json").write_text(json.dumps(coco))
    out = tmp_path / "o1" / "o2" / "o3" / "out"
    before = _files(tmp_path)
    rc, err = _cli(capsys, "data", "build-riad", "--from", str(src), "--out", str(out), "--quiet")
    assert rc == 2
    _one_error_line(err)
    created = {p for p in _files(tmp_path) - before if not p.is_dir()}
    assert {p for p in created if out not in p.parents} == set()


# ------------------------------------------------------------------------- 2. sizes before allocation


@pytest.mark.parametrize("case", ["list", "string", "wide_list"])
def test_rle_size_is_checked_before_allocating(tmp_path: Path, case: str) -> None:
    big = 8000
    size = [1, big * big] if case == "wide_list" else [big, big]
    runs = [size[0] * size[1]]
    counts = _counts_to_rle_string(runs) if case == "string" else runs
    ann = {
        "id": 1,
        "image_id": 2,
        "category_id": 1,
        "segmentation": {"size": size, "counts": counts},
        "bbox": [0, 0, 1, 1],
    }
    root = _riad(tmp_path / "riad", annotations=[ann])
    sample = next(s for s in load_dataset(root).samples if s.mask_path is not None)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="RLE"):
            read_mask(sample)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000, f"peak {peak} bytes before the error"


@pytest.mark.parametrize(
    "field,value",
    [
        ("width", "abc"),
        ("width", [32]),
        ("height", None),
        ("height", 1e400),
        ("version", "abc"),
        ("version", [1]),
        ("version", 1e400),
    ],
)
def test_non_integer_sizes_and_version_are_one_clean_error(tmp_path: Path, field: str, value) -> None:
    root = tmp_path / "riad"
    if field == "version":
        _riad(root, manifest_extra={"version": value})
    else:
        _riad(root)
        coco = json.loads((root / CLS / "annotations_test.json").read_text())
        coco["images"][1][field] = value
        (root / CLS / "annotations_test.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=f"'?{field}'? must be an integer"):
        _touch_all(root)


def test_rle_counts_must_match_the_size() -> None:
    with pytest.raises(DataError, match="RLE runs sum"):
        rle_decode({"size": [4, 4], "counts": [3, 4]})
    with pytest.raises(DataError, match="bad RLE"):
        rle_decode({"size": [4, 4], "counts": "P"})  # continuation bit set on the last character


# ---------------------------------------------------------------------------------- 3. leftovers


def _build(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _cli(
        capsys,
        "data",
        "build-riad",
        "--from",
        str(src),
        "--out",
        str(out),
        "--quiet",
        "--synthetic-per-normal",
        "0",
        *extra,
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_killed_swap_is_recovered_at_the_next_start(
    tmp_path: Path, capsys, tiny_mvtec: Path, overwrite
) -> None:
    out = tmp_path / "out"
    # What a SIGKILL between replace_dir's two renames leaves: OUT gone, the old data in OUT.tmp-*.old
    # and the new complete build in OUT.tmp-*; plus a stale temporary folder of an older killed run.
    (tmp_path / "out.tmp-abcd1234.old").mkdir()
    (tmp_path / "out.tmp-abcd1234.old" / "OLD_MARKER").write_text("old")
    (tmp_path / "out.tmp-abcd1234").mkdir()
    (tmp_path / "out.tmp-zz_99xyz").mkdir()
    (tmp_path / "out.tmp-keep-me").mkdir()  # not the builder's pattern: kept
    rc, err = _build(capsys, tiny_mvtec, out, *(["--overwrite"] if overwrite else []))
    siblings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out."))
    assert siblings == ["out.tmp-keep-me"]
    if overwrite:
        assert rc == 0 and (out / "classes.json").is_file() and not (out / "OLD_MARKER").exists()
    else:  # the old data came back, so a build without --overwrite refuses to replace it
        assert rc == 2
        _one_error_line(err)
        assert (out / "OLD_MARKER").read_text() == "old"


def test_sigkill_between_renames_loses_nothing(tmp_path: Path, tiny_mvtec: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "OLD_MARKER").write_text("old")
    script = textwrap.dedent(
        """
        import os, signal, sys
        import vmad.atomic as atomic
        real, calls = os.rename, []
        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)
        atomic.os.rename = rename
        from vmad.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    argv = [
        "data",
        "build-riad",
        "--from",
        str(tiny_mvtec),
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
        "--synthetic-per-normal",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(vmad.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, env=env, timeout=300)
    assert proc.returncode == -9
    assert not out.exists() and list(tmp_path.glob("out.tmp-*.old"))
    rc = main(argv)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert (out / "classes.json").is_file()


@pytest.mark.parametrize("case", ["symlink_loop", "parent_is_a_file", "read_only"])
def test_unusable_out_is_one_error_line(tmp_path: Path, capsys, tiny_mvtec: Path, monkeypatch, case) -> None:
    out = tmp_path / "out"
    if case == "symlink_loop":
        out.symlink_to(out)
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:  # tests may run as root, where chmod does not stop writes: the OS's refusal is simulated
        import vmad.atomic

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(tmp_path))

        monkeypatch.setattr(vmad.atomic.tempfile, "mkdtemp", refuse)
    rc, err = _build(capsys, tiny_mvtec, out)
    assert rc == 2
    _one_error_line(err)


# ------------------------------------------------------------------ 4. properties: random bad inputs

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
FAST = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

image_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: PNG_HEAD + b, st.binary(max_size=300)),
    st.builds(lambda b: JPEG_HEAD + b, st.binary(max_size=300)),
    st.builds(
        lambda w, h, b: PNG_HEAD + w.to_bytes(4, "big") + h.to_bytes(4, "big") + b,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    ),
)


def _valid_png_bytes(data: bytes, cut: int) -> bytes:
    """A real PNG truncated or with bytes overwritten: a valid header and garbage after it."""
    path = Path(tempfile.mkstemp(suffix=".png")[1])
    try:
        _png(path, size=(8, 6))
        raw = path.read_bytes()
    finally:
        path.unlink()
    cut = min(cut, len(raw))
    return raw[:cut] + data


@FAST
@given(st.one_of(image_bytes, st.builds(_valid_png_bytes, st.binary(max_size=64), st.integers(8, 200))))
def test_random_image_bytes_read_cleanly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        for suffix in (".png", ".jpg"):
            path = Path(d) / f"x{suffix}"
            path.write_bytes(data)
            try:
                arr = read_image(path)
            except VMADError:
                continue
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def mostly(valid, bad, p_bad: int = 3):
    """``valid`` most of the time (7 in 10 with ``p_bad`` 3), else ``bad``: documents stay mostly readable
    so that the deeper checks (sizes, RLE, paths) are reached."""
    valid = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    return st.integers(0, 9).flatmap(lambda k: bad if k >= 10 - p_bad else valid)


rle = st.fixed_dictionaries(
    {
        "size": mostly([H, W], st.one_of(st.lists(st.integers(-3, 30), max_size=3), json_any), 5),
        "counts": mostly(
            st.lists(st.integers(0, 400), max_size=6).map(lambda r: [*r, max(0, H * W - sum(r))]),
            st.one_of(st.lists(st.integers(-5, 400), max_size=8), st.text(max_size=12), json_any),
            5,
        ),
    }
)
polygon = st.lists(mostly(st.integers(-5, 40), json_leaf, 1), min_size=4, max_size=10)
segmentation = mostly(st.one_of(rle, st.lists(polygon, min_size=1, max_size=2)), json_any, 2)
annotation = st.fixed_dictionaries(
    {
        "id": st.integers(0, 5),
        "image_id": mostly(2, st.one_of(st.integers(0, 3), json_leaf), 2),
        "category_id": mostly(1, st.one_of(st.integers(-2, 3), st.integers(2**31, 2**40), json_leaf), 2),
        "segmentation": segmentation,
        "bbox": mostly([0, 0, 1, 1], json_any, 1),
    },
    optional={"area": json_any},
)


def image_entry(image_id: int, file_name: str, label: str):
    """A COCO image entry, each field mostly the valid value."""
    return st.fixed_dictionaries(
        {
            "id": mostly(image_id, json_leaf, 1),
            "file_name": mostly(
                file_name,
                st.one_of(st.sampled_from(["../000.png", "/etc/passwd", "", ".", "images"]), json_any),
                2,
            ),
            "width": mostly(W, st.one_of(st.integers(-2, 10**12), json_leaf), 2),
            "height": mostly(H, st.one_of(st.integers(-2, 10**12), json_leaf), 2),
            "label": mostly(label, json_leaf, 1),
            "answers": mostly(_answers(), json_any, 1),
        },
        optional={"defect_type": json_any},
    )


images_list = st.tuples(
    image_entry(1, "images/000.png", "normal"), image_entry(2, "images/001.png", "anomalous")
).map(list)


coco_doc = mostly(
    st.fixed_dictionaries(
        {
            "images": mostly(images_list, json_any, 1),
            "annotations": mostly(st.lists(annotation, min_size=1, max_size=3), json_any, 1),
            "categories": mostly([{"id": 1, "name": "scratch"}], json_any, 1),
        }
    ),
    json_any,
    1,
)
manifest_doc = mostly(
    st.fixed_dictionaries(
        {
            "format": mostly("riad", json_leaf, 1),
            "version": mostly(1, st.one_of(json_leaf, st.integers(-3, 3)), 5),
            "classes": mostly(
                {CLS: {"normal_description": "ok"}},
                st.one_of(
                    st.dictionaries(
                        st.sampled_from([CLS, "../x", "/tmp", ".", "", "a/b"]), json_any, max_size=2
                    ),
                    json_any,
                ),
                5,
            ),
        }
    ),
    json_any,
    1,
)


def _read_riad_with(coco, manifest) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = _riad(Path(d) / "riad")
        if coco is not None:
            (root / CLS / "annotations_test.json").write_text(json.dumps(coco))
        if manifest is not None:
            (root / "classes.json").write_text(json.dumps(manifest))
        try:
            _touch_all(root)
        except VMADError:
            pass


@FAST
@given(coco=coco_doc)
def test_random_annotation_json_reads_cleanly(coco) -> None:
    _read_riad_with(coco, None)


@FAST
@given(manifest=manifest_doc)
def test_random_manifest_json_reads_cleanly(manifest) -> None:
    _read_riad_with(None, manifest)


@FAST
@given(seg=rle, hw=st.tuples(st.integers(0, 12), st.integers(0, 12)))
def test_random_rle_decodes_cleanly(seg, hw) -> None:
    try:
        mask = rle_decode(seg, "<t>", hw)
    except VMADError:
        return
    assert mask.shape == hw and mask.dtype == bool
    try:
        ids = rasterize([{"id": 1, "category_id": 1, "segmentation": seg}], hw[0], hw[1])
    except VMADError:
        return
    assert ids.shape == hw


@FAST
@given(data=st.one_of(image_bytes, st.builds(_valid_png_bytes, st.binary(max_size=64), st.integers(8, 200))))
def test_random_image_files_in_a_dataset_read_cleanly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = _riad(Path(d) / "riad")
        (root / CLS / "images" / "001.png").write_bytes(data)
        try:
            _touch_all(root)
            load_coco(root / CLS / "annotations_test.json")
        except VMADError:
            pass
