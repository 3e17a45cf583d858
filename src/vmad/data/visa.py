"""VisA reader, layout as released.

``<root>/<class>/Data/Images/{Normal,Anomaly}/*.JPG``, ``<root>/<class>/Data/Masks/Anomaly/*.png`` and the
split file ``<root>/split_csv/1cls.csv`` (columns ``object,split,label,image,mask``; paths relative to
``<root>``; label ``normal``/``anomaly``). Masks hold class ids: binarised ``!= 0``. When
``<root>/<class>/image_anno.csv`` exists its ``label`` column names the defect type of each anomalous image;
otherwise the defect type is ``anomaly``. ``PATH`` may be ``<root>`` or one ``<root>/<class>`` folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

from vmad.data.io import inside_root
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import DataError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_SPLITS = {"train": "train", "test": "test", "val": "val"}


def _is_class_dir(path: Path) -> bool:
    return (path / "Data" / "Images").is_dir()


def _locate(path: Path) -> tuple[Path, str | None] | None:
    """(VisA root, class to keep or None for all), or None when ``path`` is not VisA."""
    if (path / SPLIT_CSV).is_file():
        return path, None
    if _is_class_dir(path):
        return path.parent, path.name
    if any(_is_class_dir(c) for c in path.iterdir() if c.is_dir()):
        return path, None
    return None


def detect(root: Path) -> bool:
    return _locate(root) is not None


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"unreadable CSV ({exc})") from None
    if rows and not set(_COLUMNS) <= set(rows[0]):
        found = ",".join(str(k) for k in rows[0])
        raise DataError(csv_path, f"expected columns {','.join(_COLUMNS)}, found {found}")
    # Short rows give None values, long rows a list under the None key: both read as "".
    return [{k: v if isinstance(v, str) else "" for k, v in r.items() if k is not None} for r in rows]


def _defect_types(class_dir: Path) -> dict[str, str]:
    """image path (relative to the VisA root) -> defect label, from the optional image_anno.csv."""
    anno = class_dir / "image_anno.csv"
    if not anno.is_file():
        return {}
    try:
        with anno.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(anno, f"unreadable CSV ({exc})") from None
    return {r["image"]: r["label"].strip() for r in rows if r.get("image") and r.get("label")}


def read(path: Path) -> list[Sample]:
    located = _locate(path)
    if located is None:
        raise DataError(path, "not a VisA folder (<class>/Data/Images and split_csv/1cls.csv)")
    root, only_class = located
    csv_path = root / SPLIT_CSV
    if not csv_path.is_file():
        raise DataError(csv_path, "VisA split file not found (splits come from split_csv/1cls.csv)")
    rows = _read_rows(csv_path)
    types: dict[str, dict[str, str]] = {}
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        name = row["object"].strip()
        if only_class is not None and name != only_class:
            continue
        split = _SPLITS.get(row["split"].strip().lower())
        label = row["label"].strip().lower()
        if split is None or label not in ("normal", "anomaly"):
            raise DataError(csv_path, f"line {line}: bad split {row['split']!r} or label {row['label']!r}")
        image = inside_root(root, (row["image"] or "").strip(), f"{csv_path} (line {line})")
        if not image.is_file():
            raise DataError(image, f"image listed in {csv_path} (line {line}) not found")
        if label == "normal":
            samples.append(Sample(image, name, NORMAL, "good", split))
            continue
        mask_rel = (row["mask"] or "").strip()
        mask = inside_root(root, mask_rel, f"{csv_path} (line {line})") if mask_rel else None
        if mask is None or not mask.is_file():
            raise DataError(image, f"anomalous image has no mask (line {line} of {csv_path})")
        if name not in types:
            types[name] = _defect_types(inside_root(root, name, f"{csv_path} (line {line}): class"))
        defect = types[name].get(row["image"].strip(), "anomaly") or "anomaly"
        samples.append(Sample(image, name, ANOMALOUS, defect, split, mask_path=mask, mask_spec="png-nonzero"))
    if not samples:
        raise DataError(csv_path, f"no rows for {only_class or 'any class'}")
    return samples
