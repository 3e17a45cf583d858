"""RIAD format reader (paper Sec. IV; the on-disk format is ours, written down in docs/riad_format.md).

``<root>/classes.json`` (``{"format": "riad", "version": 1,
"classes": {name: {"normal_description": str}}}``),
``<root>/<class>/images/...`` and ``<root>/<class>/annotations_<split>.json`` in COCO format: ``images``
(with extra ``label``, optional ``defect_type`` and ``answers`` {description, impact, suggestion}),
``annotations`` (``category_id``, polygon or RLE ``segmentation``, ``bbox``) and ``categories``.
The mask of an image is the rasterised union of its annotations; ``semantic_mask`` keeps category ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import DataError

MANIFEST = "classes.json"
FORMAT_VERSION = 1
ANSWER_KEYS = ("description", "impact", "suggestion")
SPLITS = ("train", "val", "test")
LABELS = {"normal": NORMAL, "anomalous": ANOMALOUS}


def annotations_file(class_dir: Path, split: str) -> Path:
    return class_dir / f"annotations_{split}.json"


def _is_class_dir(path: Path) -> bool:
    return any(annotations_file(path, s).is_file() for s in SPLITS)


def detect(root: Path) -> bool:
    return (root / MANIFEST).is_file() or _is_class_dir(root)


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None


# ------------------------------------------------------------------------------------------ COCO / RLE


def rle_decode(rle: dict, path: Path | str = "<rle>") -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": str | list[int]}``, column-major runs from 0) to bool (h, w)."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        runs = _rle_string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"bad RLE segmentation ({exc!r})") from None
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise DataError(path, f"RLE runs sum to {sum(runs)}, expected {height}*{width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
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
            region = rle_decode(seg, path)
            if region.shape != (height, width):
                raise DataError(
                    path,
                    f"annotation {ann.get('id')}: RLE size {list(region.shape)} != image {height}x{width}",
                )
        elif isinstance(seg, list):
            canvas = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for poly in seg:
                if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                    raise DataError(path, f"annotation {ann.get('id')}: polygon needs >= 3 (x, y) pairs")
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
            region = np.asarray(canvas, dtype=bool)
        else:
            raise DataError(path, f"annotation {ann.get('id')}: segmentation must be polygons or RLE")
        out[region] = int(ann["category_id"])
    return out


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
            if category not in categories or category == 0:
                raise DataError(path, f"annotation {ann.get('id')}: unknown category id {category}")
            if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
                raise DataError(path, f"annotation {ann.get('id')}: bbox must be [x, y, width, height]")
            annotations[image_id].append(ann)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"malformed COCO entry ({exc!r})") from None
    return CocoIndex(path, images, annotations, categories)


@lru_cache(maxsize=16)
def _load_coco_cached(path: str, mtime_ns: int) -> CocoIndex:
    return _validate_coco(Path(path), _load_json(Path(path)))


def load_coco(path: str | Path) -> CocoIndex:
    """Parse (cached per file and modification time) and validate a COCO annotations file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    return _load_coco_cached(str(path), path.stat().st_mtime_ns)


def _image_id(spec: str, path: Path) -> int:
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
    image_id = _image_id(spec, path)
    if image_id not in index.images:
        raise DataError(path, f"no image with id {image_id}")
    info = index.images[image_id]
    coco_hw = (int(info.get("height", image_hw[0])), int(info.get("width", image_hw[1])))
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
    return rasterize(index.annotations[_image_id(spec, path)], image_hw[0], image_hw[1], path)


def semantic_mask(sample: Sample) -> np.ndarray:
    """(H, W) int32 defect-category ids of a RIAD sample (0 = background; all 0 without annotations)."""
    from vmad.data.io import image_shape

    image_hw = image_shape(sample.image_path)
    if sample.mask_path is None:
        return np.zeros(image_hw, dtype=np.int32)
    return rasterize_image_mask(sample.mask_path, sample.mask_spec, image_hw, sample.image_path)


def annotations_of(sample: Sample) -> list[dict]:
    """The COCO annotations (with ``bbox`` [x, y, w, h] and ``category_id``) of a RIAD sample, each with an
    added ``category_name``."""
    if sample.mask_path is None:
        return []
    index = load_coco(sample.mask_path)
    anns = index.annotations.get(_image_id(sample.mask_spec, sample.mask_path), [])
    return [{**a, "category_name": index.categories[int(a["category_id"])]} for a in anns]


# ---------------------------------------------------------------------------------------------- reader


def read_manifest(root: Path) -> dict:
    """``classes.json`` of a RIAD root (or of the parent of a single class folder); {} when absent there."""
    for candidate in (root / MANIFEST, root.parent / MANIFEST):
        if candidate.is_file():
            data = _load_json(candidate)
            if (
                not isinstance(data, dict)
                or data.get("format") != "riad"
                or not isinstance(data.get("classes"), dict)
            ):
                raise DataError(
                    candidate, 'not a RIAD manifest (needs "format": "riad" and a "classes" object)'
                )
            if int(data.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
                raise DataError(
                    candidate, f"RIAD format version {data['version']} is newer than {FORMAT_VERSION}"
                )
            return data
    return {}


def _answers(info: dict, path: Path, required: bool) -> dict[str, str] | None:
    answers = info.get("answers")
    if answers is None and not required:
        return None
    if not isinstance(answers, dict) or not all(isinstance(answers.get(k), str) for k in ANSWER_KEYS):
        raise DataError(
            path, f"image {info.get('id')}: 'answers' needs string fields {', '.join(ANSWER_KEYS)}"
        )
    return {k: answers[k] for k in ANSWER_KEYS}


def _image_sample(index: CocoIndex, image_id: int, class_dir: Path, split: str, desc: str | None) -> Sample:
    info, path = index.images[image_id], index.path
    label = LABELS.get(str(info.get("label", "")))
    if label is None:
        raise DataError(path, f"image {image_id}: 'label' must be 'normal' or 'anomalous'")
    image = class_dir / str(info.get("file_name", ""))
    if not image.is_file():
        raise DataError(image, f"image {image_id} listed in {path} not found")
    anns = index.annotations[image_id]
    answers = _answers(info, path, required=label == ANOMALOUS)
    if label == NORMAL:
        if anns:
            raise DataError(path, f"image {image_id} is labelled normal but has {len(anns)} annotations")
        return Sample(image, class_dir.name, NORMAL, "good", split, answers=answers, normal_description=desc)
    names = sorted({index.categories[int(a["category_id"])] for a in anns})
    defect = str(info.get("defect_type") or "+".join(names) or "anomaly")
    return Sample(
        image,
        class_dir.name,
        ANOMALOUS,
        defect,
        split,
        mask_path=path,
        mask_spec=f"coco:{image_id}",
        answers=answers,
        normal_description=desc,
    )


def read_class(class_dir: Path, normal_description: str | None) -> list[Sample]:
    samples: list[Sample] = []
    for split in SPLITS:
        path = annotations_file(class_dir, split)
        if path.is_file():
            index = load_coco(path)
            samples.extend(
                _image_sample(index, i, class_dir, split, normal_description) for i in index.images
            )
    if not samples:
        raise DataError(class_dir, "RIAD class folder without images in annotations_{train,val,test}.json")
    return samples


def read(root: Path) -> list[Sample]:
    manifest = read_manifest(root)
    classes = manifest.get("classes", {})
    if _is_class_dir(root):
        dirs = [root]
    elif manifest:
        dirs = [root / name for name in classes]
        for d in dirs:
            if not _is_class_dir(d):
                raise DataError(d, f"class listed in {root / MANIFEST} has no annotations_<split>.json")
    else:
        raise DataError(root, f"not a RIAD folder (no {MANIFEST} and no annotations_<split>.json)")
    samples: list[Sample] = []
    for d in dirs:
        desc = (classes.get(d.name) or {}).get("normal_description")
        samples.extend(read_class(d, desc if isinstance(desc, str) else None))
    return samples
