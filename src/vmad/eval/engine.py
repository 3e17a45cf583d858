"""The evaluation engine behind ``vmad eval``: a scorer over datasets, class by class, into the metrics.

For every class of every dataset (paper Sec. V-A.1: per-class metrics, then their mean):

1. the samples of ``split`` are read (images with :func:`vmad.data.read_image`, masks with
   :func:`vmad.data.read_mask`); a class with no sample in that split is skipped and listed under ``skipped``;
2. ``scorer.score(images, class_name)`` sees all images of the class at once, or ``images_per_call`` of them
   at a time when the scorer sets it (images scored independently, e.g. a VMAD model's batch size), while
   ``settings.workers`` processes decode the next ones (:mod:`vmad.data.prefetch`);
3. post-processing, per image: the anomaly map is resized to that image's mask size by bilinear interpolation
   (``torch.nn.functional.interpolate``, ``align_corners=False``, OURS), then smoothed with a Gaussian of
   ``smoothing_sigma`` mask pixels (``scipy.ndimage.gaussian_filter``, truncate 4; default 4 as in WinCLIP /
   AnomalyCLIP evaluation code; 0 disables it). Image scores are the scorer's, untouched;
4. every metric of :mod:`vmad.eval.metrics` on the class (maps kept as float32 at mask resolution).

Results are keyed by class name; a class name found in several of the datasets becomes
``<dataset folder name>/<class>``. The mean over classes skips NaN values (a class without normal images,
e.g. NEU-Seg, has NaN image metrics; its pixel metrics still count); ``mean.n_classes`` says how many
classes each mean covers.

Timing (seconds per image, totals over all classes divided by the number of images): ``model`` = time inside
``scorer.score``; ``end_to_end`` = image loading + ``scorer.score`` + map post-processing (mask reading and
metric computation are evaluation costs and are reported separately). With decoding workers, image loading
is the time spent waiting for decoded images (the rest overlaps the scorer). A scorer with a ``prepare()``
method (optional, e.g. to load weights) has it called once before timing starts; its time is ``setup_s``.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from vmad import __version__
from vmad.data import AnomalyDataset, Sample, read_image, read_mask
from vmad.errors import DataError, VMADError
from vmad.eval import metrics
from vmad.eval.scorer import Scorer

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "f1_max_image")
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "pixel_ap", "aupro", "aupro_200", "f1_max_pixel")
METRICS: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation runs. ``split`` None = every sample. ``max_per_class``: evaluate at most this many
    images per class, evenly spaced over the class's samples in reading order so that every defect type
    stays represented (OURS). ``fpr_limit``: the AUPRO integration limit (MVTec AD: 0.3). ``workers``: image
    decoding processes that read ahead of the scorer (:mod:`vmad.data.prefetch`; 0 = read in this process
    before scoring). Results do not depend on ``workers``."""

    split: str | None = "test"
    smoothing_sigma: float = 4.0
    fpr_limit: float = 0.3
    max_per_class: int | None = None
    align_corners: bool = False
    workers: int = 0

    def validate(self) -> None:
        if self.smoothing_sigma < 0 or not math.isfinite(self.smoothing_sigma):
            raise VMADError(f"smoothing sigma must be a finite number >= 0, got {self.smoothing_sigma}")
        if not 0 < self.fpr_limit <= 1:
            raise VMADError(f"fpr_limit must be in (0, 1], got {self.fpr_limit}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise VMADError(f"max_per_class must be >= 1, got {self.max_per_class}")
        if self.workers < 0:
            raise VMADError(f"workers must be >= 0, got {self.workers}")


@dataclass
class EvalResult:
    """``results``: the JSON-ready dict written to results.json; ``markdown``: the results.md table."""

    results: dict
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Timer:
    load_s: float = 0.0
    model_s: float = 0.0
    post_s: float = 0.0
    masks_s: float = 0.0
    metrics_s: float = 0.0
    n_images: int = 0

    def add(self, other: _Timer) -> None:
        """Add ``other``'s times and image count to these."""
        for name in ("load_s", "model_s", "post_s", "masks_s", "metrics_s", "n_images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def per_image(self) -> dict[str, float | None]:
        n = self.n_images
        return {
            "model_s_per_image": self.model_s / n if n else None,
            "end_to_end_s_per_image": (self.load_s + self.model_s + self.post_s) / n if n else None,
        }


def subsample(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples, evenly spaced over ``samples`` (all of them when ``limit`` is None)."""
    samples = list(samples)
    if limit is None or len(samples) <= limit:
        return samples
    idx = np.unique(np.round(np.linspace(0, len(samples) - 1, limit)).astype(int))
    return [samples[i] for i in idx]


def resize_map(amap: np.ndarray, size: tuple[int, int], align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of one (h, w) map to ``size`` = (H, W), float32."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == tuple(size):
        return amap
    t = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=align_corners)[0, 0].numpy()


def postprocess_map(amap: np.ndarray, size: tuple[int, int], settings: EvalSettings) -> np.ndarray:
    """Resize to the mask size, then Gaussian smoothing (see the module docstring)."""
    out = resize_map(amap, size, settings.align_corners)
    if settings.smoothing_sigma > 0:
        out = ndimage.gaussian_filter(out, sigma=settings.smoothing_sigma, truncate=4.0)
    return out.astype(np.float32, copy=False)


def _check_output(out: object, n: int, who: str) -> tuple[np.ndarray, list[np.ndarray]]:
    scores = np.asarray(getattr(out, "image_scores", None), dtype=np.float64).ravel()
    raw = getattr(out, "anomaly_maps", None)
    if raw is None:
        raise VMADError(f"{who}: score() returned no anomaly_maps")
    maps = [np.asarray(m) for m in raw] if isinstance(raw, (list, tuple)) else list(metrics._to_numpy(raw))
    maps = [m[0] if m.ndim == 3 and m.shape[0] == 1 else m for m in maps]
    if scores.shape != (n,) or len(maps) != n:
        raise VMADError(f"{who}: expected {n} image scores and {n} maps, got {scores.size} and {len(maps)}")
    if any(m.ndim != 2 for m in maps):
        raise VMADError(f"{who}: anomaly maps must be 2-D per image")
    if not np.isfinite(scores).all() or any(not np.isfinite(m).all() for m in maps):
        raise VMADError(f"{who}: image scores or anomaly maps contain NaN or inf")
    return scores, maps


def _class_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float
) -> tuple[dict[str, float], list[str]]:
    """Every metric of one class and its thresholds (``"thresholds"``: :func:`metrics.class_metrics`); the
    undefined-metric warnings come back as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.UndefinedMetricWarning)
        values, thresholds = metrics.class_metrics(labels, scores, masks, maps, fpr_limit)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, metrics.UndefinedMetricWarning)})
    return {**{k: values[k] for k in METRICS}, "thresholds": thresholds}, notes


def nan_mean(rows: Sequence[dict], keys: Sequence[str] = METRICS) -> dict:
    """Per key, the mean of the non-NaN values (NaN when there are none) and how many values it covers."""
    mean: dict = {}
    covered: dict[str, int] = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not math.isnan(r[k])]
        mean[k] = float(np.mean(vals)) if vals else math.nan
        covered[k] = len(vals)
    mean["n_classes"] = covered
    return mean


def _dataset_labels(datasets: Sequence[AnomalyDataset]) -> list[str]:
    labels: list[str] = []
    for ds in datasets:
        base = Path(ds.root).resolve().name or ds.format
        label, i = base, 2
        while label in labels:
            label, i = f"{base}-{i}", i + 1
        labels.append(label)
    return labels


def _json_safe(obj: object) -> object:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


@dataclass
class _ClassJob:
    """One class to evaluate: its key in the results, its dataset's label and the samples chosen for it."""

    key: str
    dataset_label: str
    samples: list[Sample]


@dataclass
class _EvalRun:
    """What evaluating the classes one after the other collects: a row and the metric notes per class, one
    ``(class, image, label, score)`` per image (image_scores.csv) and the summed timing."""

    classes: dict[str, dict] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    per_image_rows: list[tuple[str, str, int, float]] = field(default_factory=list)
    total: _Timer = field(default_factory=_Timer)


def evaluate(
    scorer: Scorer,
    datasets: Sequence[AnomalyDataset],
    split: str | None = "test",
    out_dir: str | Path | None = None,
    smoothing_sigma: float = 4.0,
    fpr_limit: float = 0.3,
    max_per_class: int | None = None,
    progress: bool | None = None,
    settings: EvalSettings | None = None,
) -> EvalResult:
    """Run ``scorer`` over every class of ``datasets`` and compute the metrics; write results.json,
    results.md and image_scores.csv to ``out_dir`` when given. ``settings`` overrides the keyword settings.
    ``progress`` None = a progress bar only on a terminal."""
    from vmad.eval.tables import results_markdown

    settings = settings or EvalSettings(split, smoothing_sigma, fpr_limit, max_per_class)
    settings.validate()
    if not datasets:
        raise VMADError("no dataset to evaluate")
    labels = _dataset_labels(datasets)
    jobs, skipped = _class_jobs(datasets, labels, settings)
    setup_s = _prepare_scorer(scorer)
    run = _evaluate_classes(scorer, jobs, settings, progress)

    results = {
        "classes": run.classes,
        "mean": nan_mean(list(run.classes.values())),
        "datasets": _dataset_summaries(datasets, labels, run.classes),
        "timing": _timing_summary(run.total, setup_s),
        "scorer": {"name": scorer.name, "settings": scorer.settings()},
        "settings": _settings_summary(settings),
        "skipped": skipped,
        "notes": run.notes,
        "environment": {
            "vmad": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    }
    results = _json_safe(results)
    markdown = results_markdown(results)
    result = EvalResult(results=results, markdown=markdown)
    if out_dir is not None:
        result.paths = write_results(result, Path(out_dir), run.per_image_rows)
    return result


def _class_jobs(
    datasets: Sequence[AnomalyDataset], labels: Sequence[str], settings: EvalSettings
) -> tuple[list[_ClassJob], dict[str, str]]:
    """The classes to evaluate (samples of ``settings.split``, subsampled to ``max_per_class``) and the
    skipped ones with the reason. A class name found in several datasets is keyed ``<label>/<class>``."""
    seen: dict[str, int] = {}
    for dataset in datasets:
        for name in dataset.class_names():
            seen[name] = seen.get(name, 0) + 1

    jobs: list[_ClassJob] = []
    skipped: dict[str, str] = {}
    for label, dataset in zip(labels, datasets, strict=True):
        for name in dataset.class_names():
            key = f"{label}/{name}" if seen[name] > 1 else name
            chosen = dataset.select(class_name=name, split=settings.split)
            if not chosen:
                skipped[key] = (
                    f"no sample in split {settings.split!r} (splits: {', '.join(dataset.splits())})"
                )
                continue
            jobs.append(_ClassJob(key, label, subsample(chosen, settings.max_per_class)))
    if not jobs:
        raise DataError(datasets[0].root, f"no sample to evaluate in split {settings.split!r}")
    return jobs, skipped


def _prepare_scorer(scorer: Scorer) -> float:
    """Call the scorer's optional ``prepare()``; the seconds it took (0.0 without one)."""
    prepare = getattr(scorer, "prepare", None)
    if not callable(prepare):
        return 0.0
    start = time.perf_counter()
    prepare()
    return time.perf_counter() - start


def _evaluate_classes(
    scorer: Scorer, jobs: Sequence[_ClassJob], settings: EvalSettings, progress: bool | None
) -> _EvalRun:
    """Evaluate the classes one after the other under one progress bar (counted in images)."""
    run = _EvalRun()
    disable = None if progress is None else not progress
    bar = tqdm(total=sum(len(job.samples) for job in jobs), unit="img", disable=disable)
    try:
        for job in jobs:
            _evaluate_class(scorer, job, settings, bar, run)
    finally:
        bar.close()
    return run


def _evaluate_class(scorer: Scorer, job: _ClassJob, settings: EvalSettings, bar: tqdm, run: _EvalRun) -> None:
    """Score one class, post-process its maps and compute its metrics; add its row, notes, image scores and
    timing to ``run``."""
    key, samples = job.key, job.samples
    timer = _Timer(n_images=len(samples))
    scores, raw_maps = _score_class(scorer, key, samples, timer, bar, settings.workers)
    masks, maps = _masks_and_maps(key, samples, raw_maps, settings, timer, bar)

    bar.set_description(f"{key}: metrics")
    start = time.perf_counter()
    labels = np.array([s.label for s in samples])
    values, class_notes = _class_metrics(labels, scores, masks, maps, settings.fpr_limit)
    timer.metrics_s = time.perf_counter() - start
    del maps, masks
    if class_notes:
        run.notes[key] = class_notes
    run.classes[key] = _class_row(scorer, job, values, labels, timer)
    run.per_image_rows += [
        (key, str(s.image_path), s.label, float(v)) for s, v in zip(samples, scores, strict=True)
    ]
    run.total.add(timer)


def _score_class(
    scorer: Scorer, key: str, samples: Sequence[Sample], timer: _Timer, bar: tqdm, workers: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Read the class's images and score them (timed as load and model); the checked image scores and raw
    anomaly maps. A scorer with ``images_per_call`` (:class:`vmad.eval.scorer.Scorer`) gets that many images
    per call while ``workers`` processes decode the next ones (load time = time spent waiting for them);
    the others get all images of the class in one call."""
    from vmad.data.prefetch import prefetch

    chunk = getattr(scorer, "images_per_call", None)
    chunk = len(samples) if not isinstance(chunk, int) or chunk < 1 else chunk
    class_name, who = samples[0].class_name, f"scorer {scorer.name!r} on class {key!r}"
    batches = prefetch([s.image_path for s in samples], read_image, chunk, workers)
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    while True:
        bar.set_description(f"{key}: load")
        start = time.perf_counter()
        batch = next(batches, None)
        timer.load_s += time.perf_counter() - start
        if batch is None:
            break
        for _, _, error in batch:
            if error is not None:
                raise error
        images = [image for _, image, _ in batch]
        bar.set_description(f"{key}: score")
        start = time.perf_counter()
        out = scorer.score(images, class_name)
        timer.model_s += time.perf_counter() - start
        batch_scores, batch_maps = _check_output(out, len(images), who)
        scores.append(batch_scores)
        maps += batch_maps
    return np.concatenate(scores), maps


def _masks_and_maps(
    key: str,
    samples: Sequence[Sample],
    raw_maps: list[np.ndarray],
    settings: EvalSettings,
    timer: _Timer,
    bar: tqdm,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The class's ground-truth masks (timed as masks) and its anomaly maps post-processed to the mask sizes
    (timed as post-processing; ``raw_maps`` entries are freed as they are done)."""
    bar.set_description(f"{key}: masks")
    start = time.perf_counter()
    masks = [read_mask(s) for s in samples]
    timer.masks_s = time.perf_counter() - start

    bar.set_description(f"{key}: post")
    start = time.perf_counter()
    maps = []
    for i, amap in enumerate(raw_maps):
        maps.append(postprocess_map(amap, masks[i].shape, settings))
        raw_maps[i] = None  # free as we go
    timer.post_s = time.perf_counter() - start
    bar.update(len(samples))
    return masks, maps


def _class_row(
    scorer: Scorer, job: _ClassJob, values: dict[str, float], labels: np.ndarray, timer: _Timer
) -> dict:
    """One class's entry in ``results["classes"]``: its metrics, counts, timing and the scorer's timing."""
    row: dict = dict(values)
    row.update(
        dataset=job.dataset_label,
        class_name=job.samples[0].class_name,
        n_normal=int((labels == 0).sum()),
        n_anomalous=int((labels != 0).sum()),
        **timer.per_image(),
        seconds={
            "load": timer.load_s,
            "model": timer.model_s,
            "postprocess": timer.post_s,
            "masks": timer.masks_s,
            "metrics": timer.metrics_s,
        },
    )
    scorer_timing = getattr(scorer, "timing", None)
    if isinstance(scorer_timing, dict) and scorer_timing:
        row["scorer_timing"] = dict(scorer_timing)
    return row


def _dataset_summaries(
    datasets: Sequence[AnomalyDataset], labels: Sequence[str], classes: dict[str, dict]
) -> dict[str, dict]:
    """Per dataset label: its format, root, evaluated classes and their mean."""
    return {
        label: {
            "format": dataset.format,
            "root": str(dataset.root),
            "classes": [key for key, row in classes.items() if row["dataset"] == label],
            "mean": nan_mean([row for row in classes.values() if row["dataset"] == label]),
        }
        for label, dataset in zip(labels, datasets, strict=True)
    }


def _timing_summary(total: _Timer, setup_s: float) -> dict:
    """``results["timing"]``: per-image times, the totals and their definition."""
    return {
        **total.per_image(),
        "n_images": total.n_images,
        "setup_s": setup_s,
        "load_s": total.load_s,
        "model_s": total.model_s,
        "postprocess_s": total.post_s,
        "masks_s": total.masks_s,
        "metrics_s": total.metrics_s,
        "definition": "model = time inside scorer.score; end_to_end = image loading + scorer.score + map "
        "resizing/smoothing; both divided by the number of images",
    }


def _settings_summary(settings: EvalSettings) -> dict:
    """``results["settings"]``: the settings and how maps, AP, AUPRO and means are computed."""
    return {
        **asdict(settings),
        "map_resize": f"bilinear to each image's mask size (align_corners={settings.align_corners})",
        "smoothing": f"gaussian_filter(sigma={settings.smoothing_sigma} mask pixels, truncate=4)"
        if settings.smoothing_sigma > 0
        else "none",
        "ap": "step-wise (scikit-learn average_precision_score)",
        "aupro": "MVTec AD reference: 8-connected regions, every threshold, up to FPR "
        f"{settings.fpr_limit}, divided by the limit",
        "aupro_200": "AnomalyCLIP cal_pro_score: 200 thresholds, fpr < limit, FPRs min-max rescaled",
        "mean": "over classes, NaN values skipped (mean.n_classes counts the classes in each mean)",
        "thresholds": f"per class (classes.<name>.thresholds): {metrics.THRESHOLD_RULE}",
    }


def write_results(
    result: EvalResult, out_dir: Path, per_image: Sequence[tuple[str, str, int, float]] = ()
) -> dict[str, Path]:
    """results.json (NaN as null), results.md and, when given, image_scores.csv."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
        paths["json"].write_text(json.dumps(result.results, indent=2, allow_nan=False) + "\n")
        paths["markdown"].write_text(result.markdown)
        if per_image:
            paths["csv"] = out_dir / "image_scores.csv"
            with paths["csv"].open("w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["class", "image", "label", "score"])
                writer.writerows([k, p, lab, repr(v)] for k, p, lab, v in per_image)
    except OSError as exc:
        raise DataError(exc.filename or out_dir, f"cannot write results ({exc.strerror or exc})") from None
    return paths
