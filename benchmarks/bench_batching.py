"""`vmad eval --model small` at batch 1 against batch N on one class, in alternating rounds, with the
metrics checked equal: images/s of the model (time inside the scorer) and end to end (decoding wait + model
+ map post-processing), and the load average around each run.

Usage (from the repository root):
    python benchmarks/bench_batching.py [DATA] [--batches 1,8] [--rounds 2] [--workers 1] \
        [--out benchmarks/results/batching_small_cpu.md]

DATA defaults to ../shared/data/mvtec_ad/bottle (beside the repository). Each run is a fresh
``python -m vmad eval`` process writing to a temporary folder; the Markdown record (date, machine, command,
load, table) is written to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import machine_description  # benchmarks/_machine.py

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_eval(data: Path, batch: int, workers: int, out: Path, limit: int | None = None) -> dict:
    """One ``vmad eval`` process; its results.json plus the load average before and after."""
    before = _load()
    cmd = [sys.executable, "-m", "vmad", "eval", "--model", "small", "--data", str(data), "--out", str(out),
           "--batch-size", str(batch), "--workers", str(workers), "--no-progress",
           "--device", "cpu"]  # fmt: skip
    if limit:
        cmd += ["--max-per-class", str(limit)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "results.json").read_text())
    return {"batch": batch, "load_before": before, "load_after": _load(), "timing": result["timing"],
            "mean": {k: result["mean"][k] for k in METRICS}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-per-class", type=int, help="smoke test: at most N images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batching_small_cpu.md")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skip: {args.data} is absent")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in batches:
                out = Path(tmp) / f"r{r}b{b}"
                runs.append(run_eval(args.data, b, args.workers, out, args.max_per_class))
                print(json.dumps(runs[-1]), flush=True)
    equal = all(abs(run["mean"][k] - runs[0]["mean"][k]) <= 1e-6 for run in runs for k in METRICS)
    rows = []
    for b in batches:
        mine = [run for run in runs if run["batch"] == b]
        model = statistics.median(run["timing"]["model_s_per_image"] for run in mine)
        e2e = statistics.median(run["timing"]["end_to_end_s_per_image"] for run in mine)
        loads = "; ".join(f"{run['load_before']} -> {run['load_after']}" for run in mine)
        rows.append((b, model, e2e, loads))
    base_model, base_e2e = rows[0][1], rows[0][2]
    metrics = ", ".join(f"{k} {runs[0]['mean'][k]:.4f}" for k in METRICS)
    data = os.path.relpath(args.data.resolve(), REPO)
    command = "python benchmarks/bench_batching.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"## `vmad eval --model small` on `{data}`: batch {' vs '.join(map(str, batches))}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}, no GPU",
        f"- command: `{command.strip()}` (each run: `vmad eval --model small --data {data} --batch-size B "
        f"--workers {args.workers} --device cpu`, a fresh process; {args.rounds} rounds, batches "
        "alternating)",
        f"- metrics equal (within 1e-6) across all runs: {equal} ({metrics})",
        "",
        "| batch | model s/img (median) | end-to-end s/img (median) | images/s (model) | vs batch "
        f"{batches[0]} (model) | vs batch {batches[0]} (end to end) | load average before -> after "
        "each run |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {b} | {m:.3f} | {e:.3f} | {1 / m:.2f} | {base_model / m:.2f}x | {base_e2e / e:.2f}x "
              f"| {ld} |" for b, m, e, ld in rows]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")
    print(f"appended the record to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
