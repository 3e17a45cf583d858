"""Generic folder format: an images folder plus a masks folder with a configurable name mapping.

A *unit* is a folder holding ``images/`` (and optionally ``masks/``). Accepted layouts under ``PATH``:

- ``PATH/images`` — one class, named after ``PATH``, all in ``FolderConfig.default_split``;
- ``PATH/{train,val,test}/images`` — one class with splits (the MPDD re-split layout);
- ``PATH/<class>/images`` or ``PATH/<class>/{train,val,test}/images`` — one subfolder per class.

Inside ``images/``: files directly there are labelled by their mask (``masks/`` + ``mask_name``): a
missing or blank mask means normal, otherwise anomalous with defect type ``unlabelled_defect_type``.
Files in ``images/<sub>/`` are normal when ``<sub>`` is one of ``normal_dirs``, otherwise anomalous of
defect type ``<sub>``; those need a mask at ``masks/<sub>/<mask_name>`` (a blank one is accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmad.data.io import list_images, mask_is_blank
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderConfig:
    """Options of the folder format. ``mask_name`` is a template over the image file's ``{stem}``,
    ``{name}`` and ``{suffix}``. ``default_split`` for data without split folders is OURS ("test":
    data given as a plain folder is most often something to evaluate)."""

    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_name: str = "{stem}.png"
    normal_dirs: tuple[str, ...] = ("good", "normal", "ok")
    default_split: str = "test"
    mask_spec: str = "png"
    unlabelled_defect_type: str = "defect"

    def __post_init__(self) -> None:
        try:
            self.mask_name.format(stem="x", name="x.png", suffix=".png")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"mask_name {self.mask_name!r}: use only {{stem}}, {{name}}, {{suffix}} ({exc})"
            ) from None
        if self.default_split not in SPLITS:
            raise ConfigError(f"default_split must be one of {SPLITS}, got {self.default_split!r}")
        if self.mask_spec not in ("png", "png-nonzero"):
            raise ConfigError(f"mask_spec must be 'png' or 'png-nonzero', got {self.mask_spec!r}")

    def mask_for(self, masks_folder: Path, image: Path) -> Path:
        return masks_folder / self.mask_name.format(stem=image.stem, name=image.name, suffix=image.suffix)


def split_units(class_dir: Path, cfg: FolderConfig) -> list[tuple[str, Path]]:
    return [(s, class_dir / s) for s in SPLITS if (class_dir / s / cfg.images_dir).is_dir()]


def units(root: Path, cfg: FolderConfig) -> list[tuple[str, str, Path]]:
    """(class name, split, unit folder) for every unit of the layout under ``root``."""
    if (root / cfg.images_dir).is_dir():
        return [(root.name, cfg.default_split, root)]
    if by_split := split_units(root, cfg):
        return [(root.name, s, u) for s, u in by_split]
    found: list[tuple[str, str, Path]] = []
    for child in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
        if (child / cfg.images_dir).is_dir():
            found.append((child.name, cfg.default_split, child))
        else:
            found.extend((child.name, s, u) for s, u in split_units(child, cfg))
    return found


def detect(root: Path, cfg: FolderConfig | None = None) -> bool:
    return bool(units(root, cfg or FolderConfig()))


def read_unit(class_name: str, split: str, unit: Path, cfg: FolderConfig) -> list[Sample]:
    """Samples of one ``images/`` (+ ``masks/``) unit."""
    images_root, masks_root = unit / cfg.images_dir, unit / cfg.masks_dir
    samples: list[Sample] = []
    for image in list_images(images_root):
        mask = cfg.mask_for(masks_root, image)
        if mask.is_file() and not mask_is_blank(mask, cfg.mask_spec):
            defect = cfg.unlabelled_defect_type
            samples.append(Sample(image, class_name, ANOMALOUS, defect, split, mask, cfg.mask_spec))
        else:
            samples.append(Sample(image, class_name, NORMAL, "good", split))
    subdirs = sorted(d for d in images_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for sub in subdirs:
        normal = sub.name.lower() in cfg.normal_dirs
        for image in list_images(sub):
            if normal:
                samples.append(Sample(image, class_name, NORMAL, "good", split))
                continue
            mask = cfg.mask_for(masks_root / sub.name, image)
            if not mask.is_file():
                raise DataError(image, f"anomalous image (folder {sub.name!r}) has no mask (expected {mask})")
            samples.append(Sample(image, class_name, ANOMALOUS, sub.name, split, mask, cfg.mask_spec))
    return samples


def read(root: Path, cfg: FolderConfig | None = None) -> list[Sample]:
    cfg = cfg or FolderConfig()
    found = units(root, cfg)
    if not found:
        raise DataError(
            root, f"no {cfg.images_dir}/ folder (folder format: {cfg.images_dir}/ + {cfg.masks_dir}/)"
        )
    samples = [s for name, split, unit in found for s in read_unit(name, split, unit, cfg)]
    if not samples:
        raise DataError(root, f"no images found under {cfg.images_dir}/ folders")
    return samples
