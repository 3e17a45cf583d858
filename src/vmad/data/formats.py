"""Dataset formats of the real sets in ``../shared/data``: readers (detect + read) for the Magnetic-tile,
MPDD metal_plate (re-split) and NEU-Seg layouts, with their options.

Each dataset's class name is its root folder's name (e.g. ``magnetic_tile``). The other formats have a
module each (:mod:`~vmad.data.mvtec`, :mod:`~vmad.data.visa`, :mod:`~vmad.data.riad`,
:mod:`~vmad.data.folder`); :mod:`vmad.data.dataset` dispatches between all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmad.data import folder
from vmad.data.io import list_images, open_image
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------- Magnetic-tile

MT_PREFIX = "MT_"
MT_NORMAL = "MT_Free"


@dataclass(frozen=True)
class MagneticTileConfig:
    """Magnetic-tile has no official split. OURS: a sample goes to "test" when the first 8 bytes of
    sha256(``salt`` + "/" + "<type folder>/<file stem>"), read as a fraction of 2**64, fall below
    ``test_fraction``; otherwise to "train". Independent of machine, file order and the other files."""

    test_fraction: float = 0.2
    salt: str = "vmad-magnetic-tile-v1"

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ConfigError(f"test_fraction must lie in [0, 1], got {self.test_fraction}")

    def split_of(self, key: str) -> str:
        digest = hashlib.sha256(f"{self.salt}/{key}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction else "train"


def detect_magnetic_tile(root: Path) -> bool:
    return any(d.is_dir() and d.name.startswith(MT_PREFIX) and (d / "Imgs").is_dir() for d in root.iterdir())


def read_magnetic_tile(root: Path, cfg: MagneticTileConfig | None = None) -> list[Sample]:
    """``MT_<type>/Imgs/<name>.jpg`` with same-name ``.png`` masks. ``MT_Free`` is normal (its blank masks
    are not attached); every other folder is anomalous of defect type ``<type>``, blank masks included."""
    cfg = cfg or MagneticTileConfig()
    samples: list[Sample] = []
    type_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith(MT_PREFIX))
    for type_dir in type_dirs:
        imgs = type_dir / "Imgs"
        if not imgs.is_dir():
            raise DataError(type_dir, "Magnetic-tile folder without Imgs/")
        normal = type_dir.name == MT_NORMAL
        defect = "good" if normal else type_dir.name[len(MT_PREFIX) :]
        for image in (p for p in list_images(imgs) if p.suffix.lower() != ".png"):
            split = cfg.split_of(f"{type_dir.name}/{image.stem}")
            if normal:
                samples.append(Sample(image, root.name, NORMAL, defect, split))
                continue
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise DataError(image, f"anomalous image has no mask (expected {mask})")
            samples.append(Sample(image, root.name, ANOMALOUS, defect, split, mask, "png"))
    if not samples:
        raise DataError(root, "no Magnetic-tile images found (MT_<type>/Imgs/*.jpg)")
    return samples


# ----------------------------------------------------------------------------------------------- MPDD


def detect_mpdd(root: Path) -> bool:
    """The MPDD re-split layout: ``{train,val,test}/images`` with ``masks`` beside, nothing at the top."""
    if (root / "images").is_dir():
        return False
    return any((root / s / "images").is_dir() and (root / s / "masks").is_dir() for s in folder.SPLITS)


def read_mpdd(root: Path) -> list[Sample]:
    """MPDD (re-split): labelled by mask content, a blank mask = normal (folder format with splits)."""
    if not detect_mpdd(root):
        raise DataError(root, "not the MPDD re-split layout ({train,val,test}/images + masks)")
    cfg = folder.FolderConfig()
    return [
        s
        for split, unit in folder.split_units(root, cfg)
        for s in folder.read_unit(root.name, split, unit, cfg)
    ]


# -------------------------------------------------------------------------------------------- NEU-Seg

NEU_SPLITS = {"training": "train", "test": "test"}
NEU_CLASS_NAMES = {1: "inclusion", 2: "patches", 3: "scratches"}


@dataclass(frozen=True)
class NeuSegConfig:
    """``defect_types_from_masks``: decode each class-id mask to name its defect type(s) (ids 1-3:
    inclusion, patches, scratches, joined by "+" when several); off, every image is "defect"."""

    defect_types_from_masks: bool = True


def detect_neu_seg(root: Path) -> bool:
    return (root / "annotations").is_dir() and any((root / "images" / s).is_dir() for s in NEU_SPLITS)


def _neu_defect_type(mask: Path) -> str:
    colors = open_image(mask).getcolors(maxcolors=1 << 16)
    ids = sorted(int(np.max(v)) for _, v in colors or [] if np.max(v) != 0)
    return "+".join(NEU_CLASS_NAMES.get(i, f"class{i}") for i in ids) or "defect"


def read_neu_seg(root: Path, cfg: NeuSegConfig | None = None) -> list[Sample]:
    """``images/{training,test}/*.jpg`` with ``annotations/<split>/<stem>.png`` class-id masks
    (0 = background). Every image is anomalous; masks are binarised ``!= 0``."""
    cfg = cfg or NeuSegConfig()
    samples: list[Sample] = []
    for folder_name, split in NEU_SPLITS.items():
        for image in list_images(root / "images" / folder_name):
            mask = root / "annotations" / folder_name / f"{image.stem}.png"
            if not mask.is_file():
                raise DataError(image, f"anomalous image has no mask (expected {mask})")
            defect = _neu_defect_type(mask) if cfg.defect_types_from_masks else "defect"
            samples.append(Sample(image, root.name, ANOMALOUS, defect, split, mask, "png-nonzero"))
    if not samples:
        raise DataError(root, "no NEU-Seg images found (images/{training,test}/*.jpg)")
    return samples
