"""RIAD format reader (paper Sec. IV; the on-disk format is ours, written down in docs/riad_format.md).

``<root>/classes.json`` (``{"format": "riad", "version": 1,
"classes": {name: {"normal_description": str}}}``),
``<root>/<class>/images/...`` and ``<root>/<class>/annotations_<split>.json`` in COCO format: ``images``
(with extra ``label``, optional ``defect_type`` and ``answers`` {description, impact, suggestion}),
``annotations`` (``category_id``, polygon or RLE ``segmentation``, ``bbox``) and ``categories``.
The mask of an image is the rasterised union of its annotations (:mod:`vmad.data.coco`);
``semantic_mask`` keeps category ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmad.data.coco import CocoIndex, coco_image_id, load_coco, load_json, rasterize_image_mask
from vmad.data.io import image_shape, inside_root
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


def semantic_mask(sample: Sample) -> np.ndarray:
    """(H, W) int32 defect-category ids of a RIAD sample (0 = background; all 0 without annotations)."""
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
    anns = index.annotations.get(coco_image_id(sample.mask_spec, sample.mask_path), [])
    return [{**a, "category_name": index.categories[int(a["category_id"])]} for a in anns]


# ---------------------------------------------------------------------------------------------- reader


def read_manifest(root: Path) -> dict:
    """``classes.json`` of a RIAD root (or of the parent of a single class folder); {} when absent there."""
    for candidate in (root / MANIFEST, root.parent / MANIFEST):
        if candidate.is_file():
            data = load_json(candidate)
            if (
                not isinstance(data, dict)
                or data.get("format") != "riad"
                or not isinstance(data.get("classes"), dict)
            ):
                raise DataError(
                    candidate, 'not a RIAD manifest (needs "format": "riad" and a "classes" object)'
                )
            version = data.get("version", FORMAT_VERSION)
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise DataError(candidate, f"RIAD format 'version' must be an integer >= 1, got {version!r}")
            if version > FORMAT_VERSION:
                raise DataError(candidate, f"RIAD format version {version} is newer than {FORMAT_VERSION}")
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
    file_name = info.get("file_name")
    if not isinstance(file_name, str):
        raise DataError(path, f"image {image_id}: 'file_name' must be a path string")
    image = inside_root(class_dir, file_name, f"{path}: image {image_id}")
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
        dirs = [inside_root(root, name, f"{root / MANIFEST}: class {name!r}") for name in classes]
        for d in dirs:
            if not _is_class_dir(d):
                raise DataError(d, f"class listed in {root / MANIFEST} has no annotations_<split>.json")
    else:
        raise DataError(root, f"not a RIAD folder (no {MANIFEST} and no annotations_<split>.json)")
    samples: list[Sample] = []
    for d in dirs:
        entry = classes.get(d.name)
        desc = entry.get("normal_description") if isinstance(entry, dict) else None
        samples.extend(read_class(d, desc if isinstance(desc, str) else None))
    return samples
