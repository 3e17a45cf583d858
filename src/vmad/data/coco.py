"""COCO annotation files and RLE masks (the masks of RIAD data, docs/riad_format.md).

:func:`load_coco` parses and validates an annotations file (cached per file and modification time);
:func:`rasterize` draws polygon or RLE segmentations as category ids; :func:`rle_encode` /
:func:`rle_decode` are the compressed COCO RLE (pycocotools' string encoding, column-major runs).
A sample's ``mask_spec`` ``"coco:<image id>"`` names its image in the annotations file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vmad.errors import DataError


def load_json(path: Path) -> Any:
    """Parse a JSON file; DataError naming it when missing or invalid."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None


MAX_SIDE = 100_000
"""Largest image side (pixels) an annotations file may declare (``width``, ``height``, RLE ``size``)."""
MAX_PIXELS = 2**28
"""Largest RLE mask (h * w) decoded at all; against an image the RLE must also have the image's size."""


def rle_decode(
    rle: dict, path: Path | str = "<rle>", expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": str | list[int]}``, column-major runs from 0) to bool (h, w).

    Every size is checked before anything is allocated: ``size`` must be two integers in 0..MAX_SIDE (and
    equal ``expected_hw``, the image's (h, w), when given) and the runs must be >= 0 and sum to h*w."""
    try:
        size = rle["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"size {size!r} is not [height, width]")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise ValueError(f"size {size!r} is not two integers")
        height, width = size
        if not (0 <= height <= MAX_SIDE and 0 <= width <= MAX_SIDE) or height * width > MAX_PIXELS:
            raise ValueError(f"size {size!r} is outside 0..{MAX_SIDE} or over {MAX_PIXELS} pixels")
        if expected_hw is not None and (height, width) != tuple(expected_hw):
            raise DataError(path, f"RLE size {[height, width]} != image {expected_hw[0]}x{expected_hw[1]}")
        counts = rle["counts"]
        if isinstance(counts, str):
            runs = _rle_string_to_counts(counts)
        elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            runs = counts
        else:
            raise ValueError("counts must be a string or a list of integers")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(path, f"bad RLE segmentation ({exc})") from None
    total = sum(runs)
    if total != height * width or min(runs, default=0) < 0:
        raise DataError(path, f"RLE runs sum to {total}, expected {height}*{width} (or a run is negative)")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> dict:
    """bool (h, w) to compressed COCO RLE (the pycocotools string encoding)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_rle_string(runs)}


def _counts_to_rle_string(runs: list[int]) -> str:
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rle_string_to_counts(s: str) -> list[int]:
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rasterize(annotations: list[dict], height: int, width: int, path: Path | str = "<coco>") -> np.ndarray:
    """(h, w) int32 category ids (0 = background) of COCO annotations; later ones overwrite earlier."""
    out = np.zeros((height, width), dtype=np.int32)
    for ann in annotations:
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            region = rle_decode(seg, f"{path}: annotation {ann.get('id')}", (height, width))
        elif isinstance(seg, list):
            canvas = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for poly in seg:
                draw.polygon(_polygon_points(poly, path, ann.get("id")), fill=1)
            region = np.asarray(canvas, dtype=bool)
        else:
            raise DataError(path, f"annotation {ann.get('id')}: segmentation must be polygons or RLE")
        out[region] = int(ann["category_id"])
    return out


_COORD_LIMIT = 1e9


def _polygon_points(poly: Any, path: Path | str, ann_id: Any) -> list[tuple[float, float]]:
    """(x, y) points of one COCO polygon; DataError unless it is >= 3 pairs of finite numbers."""
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        raise DataError(path, f"annotation {ann_id}: polygon needs >= 3 (x, y) pairs")
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _COORD_LIMIT for v in poly
    ):
        raise DataError(path, f"annotation {ann_id}: polygon coordinates must be finite numbers")
    return [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)]


def image_dimension(info: dict, key: str, path: Path | str, default: int) -> int:
    """``width`` / ``height`` of a COCO image entry (``default`` when absent); DataError unless it is an
    integer in 1..MAX_SIDE."""
    value = info.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise DataError(
            path, f"image {info.get('id')}: {key!r} must be an integer in 1..{MAX_SIDE}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class CocoIndex:
    """A parsed, validated annotations file: images by id, annotations by image id, category names."""

    path: Path
    images: dict[int, dict]
    annotations: dict[int, list[dict]]
    categories: dict[int, str]


def _validate_coco(path: Path, data: Any) -> CocoIndex:
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise DataError(path, "COCO file needs 'images' and 'annotations' lists")
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        images = {int(im["id"]): im for im in data["images"]}
        annotations: dict[int, list[dict]] = {i: [] for i in images}
        for ann in data["annotations"]:
            image_id, category = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in images:
                raise DataError(path, f"annotation {ann.get('id')} refers to unknown image id {image_id}")
            if category not in categories or not 0 < category < 2**31:
                raise DataError(path, f"annotation {ann.get('id')}: unknown category id {category}")
            if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
                raise DataError(path, f"annotation {ann.get('id')}: bbox must be [x, y, width, height]")
            annotations[image_id].append(ann)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise DataError(path, f"malformed COCO entry ({exc!r})") from None
    return CocoIndex(path, images, annotations, categories)


@lru_cache(maxsize=16)
def _load_coco_cached(path: str, mtime_ns: int) -> CocoIndex:
    return _validate_coco(Path(path), load_json(Path(path)))


def load_coco(path: str | Path) -> CocoIndex:
    """Parse (cached per file and modification time) and validate a COCO annotations file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    return _load_coco_cached(str(path), path.stat().st_mtime_ns)


def coco_image_id(spec: str, path: Path) -> int:
    """The image id of a ``"coco:<image id>"`` mask spec."""
    try:
        return int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise DataError(path, f"bad COCO mask spec {spec!r}") from None


def check_coco_image(
    path: Path, spec: str, image_hw: tuple[int, int], image_path: Path, full: bool = False
) -> None:
    """The COCO entry of an image exists and its width/height agree with the image file; with ``full``
    its annotations are also rasterised."""
    index = load_coco(path)
    image_id = coco_image_id(spec, path)
    if image_id not in index.images:
        raise DataError(path, f"no image with id {image_id}")
    info = index.images[image_id]
    coco_hw = (
        image_dimension(info, "height", path, image_hw[0]),
        image_dimension(info, "width", path, image_hw[1]),
    )
    if coco_hw != tuple(image_hw):
        raise DataError(
            path,
            f"image {image_id} is {coco_hw[1]}x{coco_hw[0]} in the annotations but {image_path} is "
            f"{image_hw[1]}x{image_hw[0]}",
        )
    if full:
        rasterize(index.annotations[image_id], coco_hw[0], coco_hw[1], path)


def rasterize_image_mask(path: Path, spec: str, image_hw: tuple[int, int], image_path: Path) -> np.ndarray:
    """Category-id mask (h, w) of the image ``spec`` names; sizes checked against the image file."""
    check_coco_image(path, spec, image_hw, image_path)
    index = load_coco(path)
    return rasterize(index.annotations[coco_image_id(spec, path)], image_hw[0], image_hw[1], path)
