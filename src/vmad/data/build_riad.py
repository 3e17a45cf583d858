"""Write a RIAD-format dataset (docs/riad_format.md; paper Sec. IV) from any dataset the readers support.

Output, per source class: the source's normal images; its anomalous images with their masks as COCO RLE
(one annotation per 8-connected region and defect category, box from the region); and K synthetic defects
(:mod:`vmad.data.synth`) on each used normal image. Every image gets the three answers (description,
impact, suggestion) from :mod:`vmad.data.text` (normal images: "no defect found", OURS), kept from the
source when it is RIAD. Each class gets a templated normal description. The source split of each image is
kept (synthetic images take their normal image's split).

Category ids are the fixed table :data:`vmad.data.text.DEFECT_CATEGORIES` (15 types, OURS): every
annotations file lists all 15. Semantic sources keep their per-pixel types (NEU-Seg class ids, RIAD
categories); a binary mask gets the category of its image's defect type. ``defect_type`` of an image is
the source's name (e.g. ``Blowhole``) or ``synthetic_<kind>``, so counts keep real and synthetic apart.

File names: ``images/source/<path in the source>`` (bytes copied for PNG / JPEG, else re-encoded as PNG)
and ``images/synthetic/<path without suffix>_s<k>_<kind>.png``. Extra image fields ``source`` and
``synthetic`` ({kind, base}) record where an image came from; the reader ignores them.

Several sources (``--from A --from B``, OURS): the classes of every source go into one RIAD root, each
class read with its own source's layout; a class name present in two sources is a DataError naming both
(classes are never merged). ``classes.json`` ``builder.sources`` lists every source (path as given, format,
classes) in the order given; ``protocols`` of RIAD sources are merged by name.

Deterministic: every random choice comes from an RNG seeded by (seed, class, image path, purpose), so the
output bytes depend only on the sources (and their paths as given, recorded in ``classes.json``), the
options and the seed. Every written path is checked to stay inside ``<out>`` (:func:`vmad.atomic.inside_dir`).
Written atomically (:func:`vmad.atomic.atomic_dir`): built in ``<out>.tmp-XXXX`` beside ``<out>``, then
renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from vmad.atomic import atomic_dir, inside_dir, recover_dir
from vmad.data.coco import load_coco, rle_encode
from vmad.data.dataset import SPLIT_ORDER, AnomalyDataset, DataOptions, load_dataset
from vmad.data.formats import NEU_CLASS_NAMES
from vmad.data.io import image_shape, open_image, read_image, read_mask
from vmad.data.records import Sample
from vmad.data.riad import FORMAT_VERSION, MANIFEST, annotations_file, semantic_mask
from vmad.data.synth import SynthConfig, is_grey, synthesize
from vmad.data.text import (
    CATEGORIES_BY_NAME,
    DEFECT_CATEGORIES,
    SYNTHETIC_CATEGORY,
    SYNTHETIC_PREFIX,
    DefectCategory,
    TextConfig,
    canonical_category,
    defect_answers,
    normal_answers,
    normal_description,
)
from vmad.errors import ConfigError, DataError

COPY_SUFFIXES = (".png", ".jpg", ".jpeg")
_EIGHT = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class BuildConfig:
    """Options of ``vmad data build-riad``. ``max_images``: cap on source images per class (None = all);
    ``split``: the one source split to use (None = all present); ``format``: source layout (None =
    detect)."""

    synthetic_per_normal: int = 1
    max_images: int | None = None
    seed: int = 0
    split: str | None = None
    format: str | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.synthetic_per_normal < 0:
            raise ConfigError(f"--synthetic-per-normal must be >= 0, got {self.synthetic_per_normal}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {self.max_images}")
        if self.split is not None and self.split not in SPLIT_ORDER:
            raise ConfigError(f"--split must be one of {', '.join(SPLIT_ORDER)}, got {self.split!r}")


@dataclass
class ClassSummary:
    normal: int = 0
    anomalous: int = 0
    synthetic: int = 0
    splits: dict[str, int] = field(default_factory=dict)


@dataclass
class SourceSummary:
    """One source of a build: its path as given, its detected (or given) format and the classes it gave."""

    path: Path
    format: str
    classes: list[str]

    def as_dict(self) -> dict:
        return {"path": self.path.as_posix(), "format": self.format, "classes": list(self.classes)}


@dataclass
class BuildSummary:
    """What was written: per class, normal / real anomalous / synthetic image counts and images per split;
    ``sources``: every source with its format and classes (in the order given)."""

    out: Path
    source_format: str
    classes: dict[str, ClassSummary]
    sources: list[SourceSummary] = field(default_factory=list)

    def lines(self) -> list[str]:
        if len(self.sources) <= 1:
            origin = f"from a {self.source_format} dataset"
        else:
            origin = f"from {len(self.sources)} sources"
        out = [f"wrote {self.out} (RIAD format v{FORMAT_VERSION}, {origin})"]
        by_class = {name: s for s in self.sources for name in s.classes}
        for name, c in self.classes.items():
            splits = ", ".join(f"{s} {n}" for s, n in c.splits.items())
            line = (
                f"  {name}: {c.normal} normal, {c.anomalous} real anomalous, {c.synthetic} synthetic "
                f"({splits})"
            )
            if len(self.sources) > 1 and name in by_class:
                line += f"  [{by_class[name].format}: {by_class[name].path}]"
            out.append(line)
        return out


@dataclass
class _Entry:
    """One output image: its split, file name, extra COCO image fields and annotations (no ids yet)."""

    split: str
    file_name: str
    width: int
    height: int
    fields: dict
    annotations: list[dict]


# ------------------------------------------------------------------------------------------ helpers


def seeded_rng(seed: int, *parts: object) -> np.random.Generator:
    """An RNG that depends only on ``seed`` and ``parts`` (not on processing order)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *map(str, parts)]).encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def _hash_key(seed: int, rel: str) -> bytes:
    return hashlib.sha256(f"{seed}\x1f{rel}".encode()).digest()


def _rel(sample: Sample, root: Path) -> PurePosixPath:
    """The sample's image path inside the source class (the class folder's name dropped)."""
    try:
        rel = PurePosixPath(posixpath.normpath(sample.image_path.relative_to(root).as_posix()))
        if rel.parts[:1] == ("..",) or rel.is_absolute():
            raise ValueError(rel)
    except ValueError:
        digest = hashlib.sha256(str(sample.image_path).encode()).hexdigest()[:12]
        return PurePosixPath(digest, sample.image_path.name)
    if len(rel.parts) > 1 and rel.parts[0] == sample.class_name and root.name != sample.class_name:
        rel = PurePosixPath(*rel.parts[1:])
    return rel


def select_samples(samples: list[Sample], max_images: int | None, seed: int, root: Path) -> list[Sample]:
    """At most ``max_images`` samples of one class, chosen deterministically by a seeded hash of the file
    path: normal and anomalous in the source's proportion (at least one of each when both exist), the
    anomalous ones spread round-robin over the defect types."""
    if max_images is None or len(samples) <= max_images:
        return list(samples)

    def order(group: Iterable[Sample]) -> list[Sample]:
        return sorted(group, key=lambda s: _hash_key(seed, str(_rel(s, root))))

    normal = order(s for s in samples if not s.is_anomalous)
    by_type: dict[str, list[Sample]] = {}
    for s in samples:
        if s.is_anomalous:
            by_type.setdefault(s.defect_type, []).append(s)
    n_anom_total = len(samples) - len(normal)
    n_anom = round(max_images * n_anom_total / len(samples))
    if normal and n_anom_total and max_images >= 2:
        n_anom = min(max(n_anom, 1), max_images - 1)
    n_anom = min(n_anom, n_anom_total, max_images)
    n_norm = min(len(normal), max_images - n_anom)
    n_anom = min(n_anom_total, max_images - n_norm)
    queues = [order(by_type[t]) for t in sorted(by_type)]
    anomalous: list[Sample] = []
    while len(anomalous) < n_anom:
        for q in queues:
            if q and len(anomalous) < n_anom:
                anomalous.append(q.pop(0))
    return normal[:n_norm] + anomalous


def _regions(sample: Sample, fmt: str) -> tuple[np.ndarray, list[tuple[DefectCategory, np.ndarray]]]:
    """The union mask of an anomalous sample and its regions per defect category (ascending id)."""
    binary = read_mask(sample)
    per_category: dict[int, np.ndarray] = {}

    def add(category: DefectCategory, region: np.ndarray) -> None:
        if region.any():
            per_category[category.id] = per_category.get(category.id, np.zeros_like(region)) | region

    if fmt == "riad" and sample.mask_path is not None:
        ids = semantic_mask(sample)
        names = load_coco(sample.mask_path).categories
        for i in np.unique(ids[ids != 0]).tolist():
            add(canonical_category(names[int(i)]), ids == i)
    elif fmt == "neu_seg" and sample.mask_path is not None:
        raw = np.asarray(open_image(sample.mask_path))
        raw = raw[..., :3].max(axis=2) if raw.ndim == 3 else raw
        for i in np.unique(raw[raw != 0]).tolist():
            add(canonical_category(NEU_CLASS_NAMES.get(int(i), sample.defect_type)), raw == i)
    else:
        add(canonical_category(sample.defect_type), binary)
    by_id = {c.id: c for c in DEFECT_CATEGORIES}
    return binary, [(by_id[i], per_category[i]) for i in sorted(per_category)]


def _annotations(regions: list[tuple[DefectCategory, np.ndarray]]) -> list[dict]:
    """One COCO annotation (RLE, box, area) per 8-connected region of each category."""
    out = []
    for category, region in regions:
        labels, count = ndimage.label(region, structure=_EIGHT)
        boxes = ndimage.find_objects(labels)
        for i in range(1, count + 1):
            component = labels == i
            ys, xs = boxes[i - 1]
            out.append(
                {
                    "category_id": category.id,
                    "iscrowd": 0,
                    "segmentation": rle_encode(component),
                    "bbox": [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start],
                    "area": int(component.sum()),
                }
            )
    return out


def _primary(regions: list[tuple[DefectCategory, np.ndarray]], defect_type: str) -> DefectCategory:
    if not regions:
        return canonical_category(defect_type)
    return max(regions, key=lambda r: int(r[1].sum()))[0]


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if is_grey(image) else image).save(path, format="PNG")


# ------------------------------------------------------------------------------------------- entries


def _source_entry(sample: Sample, fmt: str, root: Path, class_dir: Path, cfg: BuildConfig) -> _Entry:
    rel = _rel(sample, root)
    if rel.suffix.lower() in COPY_SUFFIXES:
        file_name = str(PurePosixPath("images", "source", rel))
        target = inside_dir(class_dir, file_name, sample.image_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, target)
    else:
        file_name = str(PurePosixPath("images", "source", rel.with_suffix(".png")))
        _save_png(read_image(sample.image_path), inside_dir(class_dir, file_name, sample.image_path))
    height, width = image_shape(sample.image_path)
    fields: dict = {"source": str(rel)}
    if not sample.is_anomalous:
        fields.update(label="normal", answers=sample.answers or normal_answers(sample.class_name))
        return _Entry(sample.split, file_name, width, height, fields, [])
    binary, regions = _regions(sample, fmt)
    answers = sample.answers or defect_answers(
        sample.defect_type,
        binary,
        sample.class_name,
        seeded_rng(cfg.seed, sample.class_name, rel, "text"),
        cfg.text,
        category=_primary(regions, sample.defect_type),
    )
    fields.update(label="anomalous", defect_type=sample.defect_type, answers=answers)
    return _Entry(sample.split, file_name, width, height, fields, _annotations(regions))


def _synthetic_entries(
    sample: Sample, base_name: str, root: Path, class_dir: Path, cfg: BuildConfig, kinds: list[str]
) -> list[_Entry]:
    rel = _rel(sample, root)
    image = read_image(sample.image_path)
    entries = []
    for k, kind in enumerate(kinds):
        defect = synthesize(
            image, seeded_rng(cfg.seed, sample.class_name, rel, "synthetic", k), kind, cfg.synth
        )
        file_name = str(PurePosixPath("images", "synthetic", f"{rel.with_suffix('')}_s{k}_{kind}.png"))
        _save_png(defect.image, inside_dir(class_dir, file_name, sample.image_path))
        defect_type = f"{SYNTHETIC_PREFIX}{kind}"
        category = CATEGORIES_BY_NAME[SYNTHETIC_CATEGORY[kind]]
        answers = defect_answers(
            defect_type,
            defect.mask,
            sample.class_name,
            seeded_rng(cfg.seed, sample.class_name, rel, "synthetic-text", k),
            cfg.text,
            category=category,
        )
        fields = {
            "label": "anomalous",
            "defect_type": defect_type,
            "answers": answers,
            "source": str(rel),
            "synthetic": {"kind": kind, "base": base_name},
        }
        h, w = defect.mask.shape
        entries.append(_Entry(sample.split, file_name, w, h, fields, _annotations([(category, defect.mask)])))
    return entries


def _coco(entries: list[_Entry]) -> dict:
    images, annotations = [], []
    for image_id, e in enumerate(sorted(entries, key=lambda e: e.file_name), start=1):
        images.append(
            {"id": image_id, "file_name": e.file_name, "width": e.width, "height": e.height, **e.fields}
        )
        for ann in e.annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": c.id, "name": c.name} for c in DEFECT_CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------------- driver


@dataclass
class _Source:
    """One source dataset of a build: its path as given, the dataset and the samples chosen per class."""

    path: Path
    dataset: AnomalyDataset
    chosen: dict[str, list[Sample]]


def check_output_dir(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an unusable ``out`` (a file, a symlink loop, non-empty without ``overwrite``, overlapping a
    source); first repair what a killed earlier build left beside it (:func:`vmad.atomic.recover_dir`:
    an interrupted ``--overwrite`` gets its old folder back, stale ``<out>.tmp-*`` folders are deleted)."""
    try:
        dst = out.resolve()
    except (OSError, RuntimeError) as exc:
        raise DataError(out, f"cannot resolve the output folder ({exc})") from None
    if out.is_symlink() and not out.exists():
        raise DataError(out, "is a broken symlink or a symlink loop")
    try:
        recover_dir(out)
        if out.exists() and not out.is_dir():
            raise DataError(out, "exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise DataError(out, "folder exists and is not empty (pass --overwrite to replace it)")
    except OSError as exc:
        problem = f"cannot use the output folder ({exc.strerror or exc})"
        raise DataError(exc.filename or out, problem) from None
    for source in sources:
        src = source.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise DataError(out, f"output folder overlaps the source {source}")


def _class_kinds(cfg: BuildConfig, class_name: str) -> list[str]:
    kinds = list(cfg.synth.kinds)
    seeded_rng(cfg.seed, class_name, "kinds").shuffle(kinds)
    return kinds


def _source_list(
    source: str | Path | Sequence[str | Path], formats: Sequence[str | None] | None, cfg: BuildConfig
) -> list[tuple[Path, str | None]]:
    """``[(path, format or None = detect)]``: one path or a list; ``formats`` None = ``cfg.format`` for all,
    else one entry per source."""
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise ConfigError("build-riad needs at least one source (--from PATH)")
    if formats is None:
        return [(p, cfg.format) for p in paths]
    if len(formats) != len(paths):
        raise ConfigError(f"{len(formats)} source formats given for {len(paths)} sources (one per source)")
    return list(zip(paths, formats, strict=True))


def _load_source(path: Path, fmt: str | None, cfg: BuildConfig, options: DataOptions | None) -> _Source:
    dataset: AnomalyDataset = load_dataset(path, fmt, options)
    if cfg.split is not None and cfg.split not in dataset.splits():
        raise DataError(path, f"no {cfg.split} split (splits: {', '.join(dataset.splits())})")
    chosen = {
        name: select_samples(dataset.select(name, cfg.split), cfg.max_images, cfg.seed, dataset.root)
        for name in dataset.class_names()
    }
    return _Source(path, dataset, {name: samples for name, samples in chosen.items() if samples})


def _check_clashes(sources: list[_Source]) -> None:
    """Every class is written by exactly one source: a class name in two sources is a DataError."""
    owner: dict[str, Path] = {}
    for src in sources:
        for name in src.chosen:
            if name in owner:
                raise DataError(
                    src.path,
                    f"class {name!r} is also in source {owner[name]}: class names must be unique across "
                    "sources (build the two separately or rename one class folder)",
                )
            owner[name] = src.path


def _merged_protocols(sources: list[_Source]) -> dict | None:
    """The ``protocols`` of RIAD sources, merged by name; one name with two different values is an error."""
    merged: dict = {}
    origin: dict[str, Path] = {}
    for src in sources:
        protocols = src.dataset.meta.get("protocols")
        if not isinstance(protocols, dict):
            continue
        for name, value in protocols.items():
            if name in merged and merged[name] != value:
                raise DataError(src.path, f"protocol {name!r} differs from the one in source {origin[name]}")
            merged[name], origin[name] = value, src.path
    return merged or None


def build_riad(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    cfg: BuildConfig | None = None,
    overwrite: bool = False,
    progress: bool = False,
    options: DataOptions | None = None,
    formats: Sequence[str | None] | None = None,
) -> BuildSummary:
    """Read ``source`` (one dataset folder, or a list of them, any supported layouts), write one RIAD
    dataset holding the classes of every source to ``out`` and return what it holds.

    ``formats``: one layout per source (None entries = detect); None = ``cfg.format`` for every source.
    A class name found in two sources is a DataError naming both. A non-empty ``out`` is refused unless
    ``overwrite``; a failure leaves ``out`` untouched."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    pairs = _source_list(source, formats, cfg)
    check_output_dir(out, [p for p, _ in pairs], overwrite)
    sources = [_load_source(path, fmt, cfg, options) for path, fmt in pairs]
    _check_clashes(sources)
    protocols = _merged_protocols(sources)
    try:
        with atomic_dir(out) as tmp:
            summary = _build(sources, protocols, tmp, cfg, progress)
    except OSError as exc:
        raise DataError(exc.filename or out, f"cannot write the output ({exc.strerror or exc})") from None
    summary.out = out
    return summary


def _build_class(
    name: str, samples: list[Sample], dataset: AnomalyDataset, class_dir: Path, cfg: BuildConfig, bar: tqdm
) -> tuple[ClassSummary, str]:
    """Write one class folder; return its counts and its normal description."""
    kinds = _class_kinds(cfg, name)
    entries: list[_Entry] = []
    c = ClassSummary()
    n_synth = 0
    for sample in sorted(samples, key=lambda s: str(_rel(s, dataset.root))):
        entry = _source_entry(sample, dataset.format, dataset.root, class_dir, cfg)
        entries.append(entry)
        if sample.is_anomalous:
            c.anomalous += 1
        else:
            c.normal += 1
            ks = [kinds[(n_synth + k) % len(kinds)] for k in range(cfg.synthetic_per_normal)]
            n_synth += len(ks)
            entries += _synthetic_entries(sample, entry.file_name, dataset.root, class_dir, cfg, ks)
        bar.update(1)
    c.synthetic = n_synth
    for split in SPLIT_ORDER:
        in_split = [e for e in entries if e.split == split]
        if in_split:
            c.splits[split] = len(in_split)
            _write_json(annotations_file(class_dir, split), _coco(in_split))
    description = next((s.normal_description for s in samples if s.normal_description), None)
    return c, description or normal_description(name, seeded_rng(cfg.seed, name, "normal"))


def _build(
    sources: list[_Source], protocols: dict | None, tmp: Path, cfg: BuildConfig, progress: bool
) -> BuildSummary:
    manifest_classes: dict[str, dict] = {}
    summary = BuildSummary(tmp, _format_label(sources), {})
    total = sum(len(s) for src in sources for s in src.chosen.values())
    with tqdm(total=total, desc="build-riad", unit="img", disable=not progress) as bar:
        for src in sources:
            summary.sources.append(SourceSummary(src.path, src.dataset.format, list(src.chosen)))
            for name, samples in src.chosen.items():
                class_dir = inside_dir(tmp, name, src.path)
                c, description = _build_class(name, samples, src.dataset, class_dir, cfg, bar)
                manifest_classes[name] = {"normal_description": description}
                summary.classes[name] = c
    manifest = {
        "format": "riad",
        "version": FORMAT_VERSION,
        "classes": manifest_classes,
        "builder": {
            "source_format": summary.source_format,
            "sources": [s.as_dict() for s in summary.sources],
            "seed": cfg.seed,
            "synthetic_per_normal": cfg.synthetic_per_normal,
            "max_images": cfg.max_images,
            "split": cfg.split,
            "synthetic_kinds": list(cfg.synth.kinds),
        },
    }
    if protocols is not None:
        manifest["protocols"] = protocols
    _write_json(tmp / MANIFEST, manifest)
    return summary


def _format_label(sources: list[_Source]) -> str:
    """The source format, or the distinct formats joined by ``+`` (source order) for mixed sources."""
    return "+".join(dict.fromkeys(src.dataset.format for src in sources))
