"""Generic folder format: an images folder plus a masks folder with a configurable name mapping.

A *unit* is a folder holding ``images/`` (and optionally ``masks/``). Accepted layouts under ``PATH``:

- ``PATH/images`` — one class, named after ``PATH``, all in ``FolderConfig.default_split``;
- ``PATH/{train,val,test}/images`` — one class with splits (the MPDD re-split layout);
- ``PATH/<class>/images`` or ``PATH/<class>/{train,val,test}/images`` — one subfolder per class.

Inside ``images/``: files directly there are labelled by their mask (``masks/`` + ``mask_name``): a
missing or blank mask means normal, otherwise anomalous with defect type ``unlabelled_defect_type``.
Files in ``images/<sub>/`` are normal when ``<sub>`` is one of ``normal_dirs``, otherwise anomalous of
defect type ``<sub>``; those need a mask at ``masks/<sub>/<mask_name>`` (a blank one is accepted).

A ``masks/`` folder holding image files of which none matches an image by ``mask_name`` (e.g. MVTec-style
``x_mask.png`` beside ``x.png`` under the default ``{stem}.png``) would read every image as normal: that
gives a :class:`~vmad.errors.DataWarning` naming the template that would match, when one does
(``--mask-name '{stem}_mask.png'``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from vmad.data.io import list_images, mask_is_blank
from vmad.data.records import ANOMALOUS, NORMAL, Sample
from vmad.errors import ConfigError, DataError, DataWarning

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderConfig:
    """Options of the folder format. ``mask_name`` is a template over the image file's ``{stem}``,
    ``{name}`` and ``{suffix}``. ``default_split`` is the split of data without split folders (OURS): None
    = ``"test"`` when reading to inspect or evaluate (data given as a plain folder is most often something to
    evaluate) and ``"train"`` when ``vmad train`` reads it (:func:`vmad.train.dataset.load_training_samples`
    sets it); a split name there is used as given."""

    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_name: str = "{stem}.png"
    normal_dirs: tuple[str, ...] = ("good", "normal", "ok")
    default_split: str | None = None
    mask_spec: str = "png"
    unlabelled_defect_type: str = "defect"

    def __post_init__(self) -> None:
        try:
            self.mask_name.format(stem="x", name="x.png", suffix=".png")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"mask_name {self.mask_name!r}: use only {{stem}}, {{name}}, {{suffix}} ({exc})"
            ) from None
        if self.default_split is not None and self.default_split not in SPLITS:
            raise ConfigError(f"default_split must be one of {SPLITS}, got {self.default_split!r}")
        if self.mask_spec not in ("png", "png-nonzero"):
            raise ConfigError(f"mask_spec must be 'png' or 'png-nonzero', got {self.mask_spec!r}")

    @property
    def plain_split(self) -> str:
        """The split of data without split folders: ``default_split``, None meaning ``"test"``."""
        return self.default_split or "test"

    def mask_for(self, masks_folder: Path, image: Path) -> Path:
        return masks_folder / self.mask_name.format(stem=image.stem, name=image.name, suffix=image.suffix)


def split_units(class_dir: Path, cfg: FolderConfig) -> list[tuple[str, Path]]:
    return [(s, class_dir / s) for s in SPLITS if (class_dir / s / cfg.images_dir).is_dir()]


def units(root: Path, cfg: FolderConfig) -> list[tuple[str, str, Path]]:
    """(class name, split, unit folder) for every unit of the layout under ``root``."""
    if (root / cfg.images_dir).is_dir():
        return [(root.name, cfg.plain_split, root)]
    if by_split := split_units(root, cfg):
        return [(root.name, s, u) for s, u in by_split]
    found: list[tuple[str, str, Path]] = []
    for child in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
        if (child / cfg.images_dir).is_dir():
            found.append((child.name, cfg.plain_split, child))
        else:
            found.extend((child.name, s, u) for s, u in split_units(child, cfg))
    return found


def detect(root: Path, cfg: FolderConfig | None = None) -> bool:
    return bool(units(root, cfg or FolderConfig()))


def suggest_mask_name(images: list[Path], masks: list[Path]) -> str | None:
    """A ``mask_name`` template under which mask files of ``masks`` match images (the mask's name with the
    image's stem replaced by ``{stem}``, e.g. ``{stem}_mask.png``), tried on the first images; None when no
    template matches."""
    names = {m.name for m in masks}
    for image in images[:20]:
        for name in sorted(names):
            if name.startswith(image.stem) and name != image.name:
                template = "{stem}" + name[len(image.stem):]
                hits = sum(template.format(stem=i.stem) in names for i in images)
                if hits >= max(1, len(images) // 2) or hits == len(names):
                    return template
    return None


def _check_mask_matches(unit: Path, images: list[Path], matched: int, cfg: FolderConfig) -> None:
    """DataWarning when the unit's masks folder holds images but no mask file matched any image."""
    masks = list_images(unit / cfg.masks_dir)
    if matched or not images or not masks:
        return
    hint = suggest_mask_name(images, masks)
    fix = f"; they match with --mask-name '{hint}'" if hint else (
        "; set the mask file name template with --mask-name (fields {stem}, {name}, {suffix})")
    warnings.warn(
        f"{unit / cfg.masks_dir}: {len(masks)} mask file(s) but none is named {cfg.mask_name!r} after an "
        f"image (e.g. {cfg.mask_for(Path(), images[0]).name} for {images[0].name}), so all {len(images)} "
        f"images read as normal{fix}",
        DataWarning,
        stacklevel=2,
    )


def read_unit(class_name: str, split: str, unit: Path, cfg: FolderConfig) -> list[Sample]:
    """Samples of one ``images/`` (+ ``masks/``) unit (a DataWarning when ``masks/`` holds files of which
    none matches an image: see the module docstring)."""
    images_root, masks_root = unit / cfg.images_dir, unit / cfg.masks_dir
    samples: list[Sample] = []
    top = list_images(images_root)
    matched = 0
    for image in top:
        mask = cfg.mask_for(masks_root, image)
        matched += mask.is_file()
        if mask.is_file() and not mask_is_blank(mask, cfg.mask_spec):
            defect = cfg.unlabelled_defect_type
            samples.append(Sample(image, class_name, ANOMALOUS, defect, split, mask, cfg.mask_spec))
        else:
            samples.append(Sample(image, class_name, NORMAL, "good", split))
    _check_mask_matches(unit, top, matched, cfg)
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
