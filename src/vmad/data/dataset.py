"""One dataset object for every layout, format detection and per-class counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmad.data import folder, formats, mvtec, riad, visa
from vmad.data.io import check_sample
from vmad.data.records import Sample
from vmad.errors import ConfigError, DataError

DATA_FORMATS: tuple[str, ...] = ("mvtec", "visa", "riad", "folder", "magnetic_tile", "mpdd", "neu_seg")
FORMAT_ALIASES: dict[str, str] = {"wfdd": "mvtec"}
SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class DataOptions:
    """Per-format options (the defaults are what ``vmad data inspect`` uses)."""

    folder: folder.FolderConfig = field(default_factory=folder.FolderConfig)
    magnetic_tile: formats.MagneticTileConfig = field(default_factory=formats.MagneticTileConfig)
    neu_seg: formats.NeuSegConfig = field(default_factory=formats.NeuSegConfig)


OPTION_SECTIONS: tuple[str, ...] = ("folder", "magnetic_tile", "neu_seg")


def data_options(
    mask_name: str | None = None, pairs: Sequence[str] = (), base: DataOptions | None = None
) -> DataOptions:
    """``base`` (default :class:`DataOptions`) with ``--data-opt SECTION.FIELD=VALUE`` pairs (e.g.
    ``folder.masks_dir=gt``, ``folder.normal_dirs=good,ok``, ``magnetic_tile.test_fraction=0.3``) and
    ``--mask-name`` (= ``folder.mask_name``) on top; ConfigError naming a bad key or value."""
    from vmad.config import from_mapping, merge, to_dict

    data: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in OPTION_SECTIONS or not name:
            raise ConfigError(
                f"--data-opt {pair!r}: expected SECTION.FIELD=VALUE with SECTION one of "
                f"{', '.join(OPTION_SECTIONS)} (e.g. folder.mask_name={{stem}}_mask.png)"
            )
        data.setdefault(section, {})[name] = value.strip()
    if mask_name is not None:
        data.setdefault("folder", {})["mask_name"] = mask_name
    if not data:
        return base or DataOptions()
    return from_mapping(DataOptions, merge(to_dict(base or DataOptions()), data), "data options")


@dataclass
class ClassCounts:
    """Image counts of one class; ``masks`` counts images with a ground-truth mask (blank ones included);
    ``defect_types`` counts anomalous images per defect type."""

    normal: int = 0
    anomalous: int = 0
    masks: int = 0
    defect_types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "normal": self.normal,
            "anomalous": self.anomalous,
            "masks": self.masks,
            "defect_types": dict(sorted(self.defect_types.items())),
        }


@dataclass
class AnomalyDataset:
    """The samples of a dataset on disk, whatever its layout. ``meta`` holds format-level extras
    (the RIAD manifest)."""

    format: str
    root: Path
    samples: list[Sample]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def class_names(self) -> list[str]:
        return sorted({s.class_name for s in self.samples})

    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in SPLIT_ORDER if s in present]

    def select(self, class_name: str | None = None, split: str | None = None) -> list[Sample]:
        """Samples of one class and/or split (None = all). An unknown class or split is a DataError."""
        if class_name is not None and class_name not in self.class_names():
            raise DataError(self.root, f"no class {class_name!r} (classes: {', '.join(self.class_names())})")
        if split is not None and split not in SPLIT_ORDER:
            raise DataError(self.root, f"unknown split {split!r} (one of {', '.join(SPLIT_ORDER)})")
        return [
            s
            for s in self.samples
            if (class_name is None or s.class_name == class_name) and (split is None or s.split == split)
        ]

    def counts(self, split: str | None = None) -> dict[str, ClassCounts]:
        """Per-class counts over ``split`` (None = all splits)."""
        out = {name: ClassCounts() for name in self.class_names()}
        for s in self.select(split=split):
            c = out[s.class_name]
            if s.is_anomalous:
                c.anomalous += 1
                c.defect_types[s.defect_type] = c.defect_types.get(s.defect_type, 0) + 1
            else:
                c.normal += 1
            c.masks += s.mask_path is not None
        return out

    def check(self, decode: bool = False, split: str | None = None) -> None:
        """Check every sample's files (headers only, or full decoding); the first problem is a DataError."""
        for s in self.select(split=split):
            check_sample(s, decode=decode)


_Reader = Callable[[Path, DataOptions], list[Sample]]
_SPECIFIC: dict[str, tuple[Callable[[Path], bool], _Reader]] = {
    "mvtec": (mvtec.detect, lambda p, o: mvtec.read(p)),
    "visa": (visa.detect, lambda p, o: visa.read(p)),
    "riad": (riad.detect, lambda p, o: riad.read(p)),
    "magnetic_tile": (
        formats.detect_magnetic_tile,
        lambda p, o: formats.read_magnetic_tile(p, o.magnetic_tile),
    ),
    "mpdd": (formats.detect_mpdd, lambda p, o: formats.read_mpdd(p)),
    "neu_seg": (formats.detect_neu_seg, lambda p, o: formats.read_neu_seg(p, o.neu_seg)),
}


# Layouts that the folder format reads the same way (a folder-format class may have split subfolders).
_FOLDER_COMPATIBLE = ("mpdd",)


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if not path.is_dir():
        raise DataError(path, "not a folder (give a dataset root or class folder)")
    if not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise DataError(path, "empty folder")


def detect_format(path: str | Path, options: DataOptions | None = None) -> str:
    """The one format whose layout ``path`` has. The dedicated layouts are tried first; the generic
    folder format only when none of them matches. No match or several: DataError asking for --format."""
    path = Path(path)
    _check_folder(path)
    matches = [name for name, (detect, _) in _SPECIFIC.items() if detect(path)]
    if len(matches) > 1:
        raise DataError(path, f"layout matches several formats ({', '.join(matches)}); pass --format")
    if matches:
        return matches[0]
    nested = [
        f"{child.name} ({name})"
        for child in sorted(c for c in path.iterdir() if c.is_dir())
        for name, (detect, _) in _SPECIFIC.items()
        if name not in _FOLDER_COMPATIBLE and detect(child)
    ]
    if nested:
        raise DataError(path, f"holds several datasets: {', '.join(nested)}; inspect each one")
    if folder.detect(path, (options or DataOptions()).folder):
        return "folder"
    raise DataError(path, f"unrecognised dataset layout; pass --format (one of {', '.join(DATA_FORMATS)})")


def load_dataset(
    path: str | Path, format: str | None = None, options: DataOptions | None = None
) -> AnomalyDataset:
    """Read a dataset root (several classes) or a single class folder; ``format`` None = detect it."""
    path = Path(path)
    options = options or DataOptions()
    if format is not None:
        format = FORMAT_ALIASES.get(format, format)
        if format not in DATA_FORMATS:
            raise DataError(path, f"unknown format {format!r} (one of {', '.join(DATA_FORMATS)})")
    try:
        if format is None:
            format = detect_format(path, options)
        else:
            _check_folder(path)
        if format == "folder":
            samples = folder.read(path, options.folder)
        else:
            samples = _SPECIFIC[format][1](path, options)
        meta = riad.read_manifest(path) if format == "riad" else {}
    except OSError as exc:
        raise DataError(exc.filename or path, exc.strerror or str(exc)) from None
    if not samples:
        raise DataError(path, f"no images found for format {format}")
    return AnomalyDataset(format=format, root=path, samples=samples, meta=meta)
