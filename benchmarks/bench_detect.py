"""Time segmentation-only `vmad detect` per image (issue 6 acceptance: median < 1 s per image on this CPU over
the 83 MVTec AD bottle test images, model loaded once).

Usage: python benchmarks/bench_detect.py [PATH] [--model small|CKPT] [--limit N] [--warmup K] [--threads T]
[--class-name NAME] [--device cpu] [--out FILE.md]

PATH (default ``../shared/data/mvtec_ad/bottle``) is a dataset the readers support (its test-split images;
all images when it has no test split) or any folder of images (all of them, recursively). What is timed is
what ``vmad detect --no-answer`` does per image, without writing the PNGs: the model is loaded once
(``Detector.from_pretrained``, timed as the load time), then for each image ``detector.detect(path,
answer=False)`` (reading and decoding the file, the paper's segmentation-only question with the object name,
one forward, the mask and score at the input size). ``--warmup`` first runs (on the first image) are timed
but not counted. Prints the load time and per-image median / mean / p90 / min / max seconds, and with
``--out`` appends a markdown record (date, machine, command, figures) to that file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine_description  # benchmarks/_machine.py

from vmad.data import load_dataset
from vmad.errors import DataError, VMADError

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"




def _load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def collect_images(path: Path, limit: int | None) -> tuple[list[Path], list[str | None], str]:
    """``(image files, class name per image, description)``: a dataset's test split (all splits when it has
    no test split), else every image file under a folder. ``limit``: the first N in sorted order."""
    try:
        dataset = load_dataset(path)
    except DataError:
        dataset = None
    if dataset is not None:
        samples = [s for s in dataset.samples if s.split == "test"] or list(dataset.samples)
        split = "test split" if any(s.split == "test" for s in dataset.samples) else "all splits"
        samples = sorted(samples, key=lambda s: str(s.image_path))[:limit]
        what = f"{dataset.format} dataset, {split}"
        return [s.image_path for s in samples], [s.class_name for s in samples], what
    from vmad.cli.detect import find_images

    _, files = find_images(path, path / ".bench_detect_no_output")
    files = files[:limit]
    return files, [None] * len(files), "image folder"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_DATA, help="dataset or image folder")
    parser.add_argument("--model", default="small", metavar="small|PATH", help="packaged model or checkpoint")
    parser.add_argument("--class-name", metavar="NAME",
                        help="object name in the question (default: the dataset's class, else 'object')")
    parser.add_argument("--limit", type=int, metavar="N", help="time only the first N images")
    parser.add_argument("--warmup", type=int, default=1, metavar="K", help="warm-up runs, not counted (1)")
    parser.add_argument("--threads", type=int, metavar="T", help="torch.set_num_threads(T)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, help="append a markdown record to this file")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.path.exists():
        print(f"skip: {args.path} is absent")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from vmad.infer.detector import Detector, DetectorConfig, resolve_model_path

    load_avg_start = _load_average()
    try:
        weights = resolve_model_path(args.model)
        files, classes, what = collect_images(args.path, args.limit)
        start = time.perf_counter()
        detector = Detector.from_pretrained(weights, device=args.device, config=DetectorConfig(batch_size=1))
        load_s = time.perf_counter() - start
    except VMADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def run(i: int) -> tuple[float, float]:
        name = args.class_name or classes[i]
        t0 = time.perf_counter()
        [det] = detector.detect(files[i], answer=False, class_name=name)
        return time.perf_counter() - t0, det.anomaly_score

    warm = [run(0)[0] for _ in range(args.warmup)]
    times = []
    for i in range(len(files)):
        seconds, _ = run(i)
        times.append(seconds)
    median, mean, p90 = statistics.median(times), statistics.fmean(times), percentile(times, 90)
    cfg = detector.model.config
    preset = getattr(cfg, "preset", "?")
    print(f"model {args.model} ({preset} preset, weights {weights}) on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"images: {len(files)} from {args.path} ({what})")
    print(f"load: {load_s:.2f} s; warm-up: {', '.join(f'{w:.3f}' for w in warm) or 'none'} s")
    print(f"per image (s): median {median:.3f}  mean {mean:.3f}  p90 {p90:.3f}  "
          f"min {min(times):.3f}  max {max(times):.3f}  total {sum(times):.1f}")
    if args.out:
        repo = Path(__file__).resolve().parents[1]

        def shown(p: Path) -> str:  # paths relative to the repository, never this machine's absolute ones
            return os.path.relpath(Path(p).resolve(), repo)

        command = "python benchmarks/bench_detect.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        lines = [
            f"## Segmentation-only `vmad detect`: {args.model} on {args.path.name} ({len(files)} images)",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine_description()}; load average at start: {load_avg_start}",
            f"- software: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}",
            f"- model: `{args.model}` ({preset} preset, weights `{shown(weights)}`)",
            f"- images: {len(files)} from `{shown(args.path)}` ({what}); {args.warmup} warm-up run(s) on the "
            "first image not counted",
            f"- command: `{command.strip()}`",
            "- timed per image: `Detector.detect(path, answer=False)` (read + decode, segmentation-only "
            "question, one forward, mask and score at the input size); the model loaded once",
            "",
            "| load (s) | median (s/img) | mean (s/img) | p90 (s/img) | min (s/img) | max (s/img) "
            "| total (s) |",
            "|---|---|---|---|---|---|---|",
            f"| {load_s:.2f} | {median:.3f} | {mean:.3f} | {p90:.3f} | {min(times):.3f} | {max(times):.3f} "
            f"| {sum(times):.1f} |",
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended the record to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
