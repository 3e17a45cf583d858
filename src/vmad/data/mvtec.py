"""MVTec AD layout reader (also WFDD, which uses the same layout).

One class folder holds ``train/good/*``, ``test/good/*``, ``test/<defect>/*`` and
``ground_truth/<defect>/<stem>_mask.png`` (0/255). A dataset root holds one such folder per class.
Every anomalous test image must have its mask; a blank mask is accepted.
"""

from __future__ import annotations

from pathlib import Path

from vmad.data.io import list_images
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import DataError

GOOD = "good"
MASK_NAMES = ("{stem}_mask.png", "{stem}.png")  # the MVTec AD name first; the second is a common variant


def is_class_dir(path: Path) -> bool:
    """True when ``path`` looks like one MVTec-layout class folder."""
    return (
        (path / "train" / GOOD).is_dir()
        or (path / "test" / GOOD).is_dir()
        or ((path / "test").is_dir() and (path / "ground_truth").is_dir())
    )


def class_dirs(root: Path) -> list[Path]:
    """``[root]`` for a class folder, else the class folders directly under ``root``."""
    if is_class_dir(root):
        return [root]
    return sorted(c for c in root.iterdir() if c.is_dir() and is_class_dir(c))


def detect(root: Path) -> bool:
    return bool(class_dirs(root))


def _find_mask(class_dir: Path, defect: str, image: Path) -> Path:
    folder = class_dir / "ground_truth" / defect
    candidates = [folder / name.format(stem=image.stem) for name in MASK_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(image, f"anomalous image has no mask (expected {candidates[0]})")


def read_class(class_dir: Path) -> list[Sample]:
    """All samples of one class folder."""
    name = class_dir.name
    samples = [
        Sample(image_path=p, class_name=name, label=NORMAL, defect_type=GOOD, split="train")
        for p in list_images(class_dir / "train" / GOOD)
    ]
    test_dir = class_dir / "test"
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == GOOD:
                samples.append(Sample(image, name, NORMAL, GOOD, "test"))
            else:
                mask = _find_mask(class_dir, defect, image)
                samples.append(
                    Sample(image, name, ANOMALOUS, defect, "test", mask_path=mask, mask_spec="png")
                )
    if not samples:
        raise DataError(class_dir, "MVTec-layout class folder holds no images under train/good or test/*")
    return samples


def read(root: Path) -> list[Sample]:
    """Samples of a class folder or of every class folder under a dataset root."""
    dirs = class_dirs(root)
    if not dirs:
        raise DataError(
            root, "no MVTec-layout class folder (train/good, test/<defect>, ground_truth/<defect>)"
        )
    return [s for d in dirs for s in read_class(d)]
