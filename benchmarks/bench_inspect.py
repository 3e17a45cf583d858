"""Time `vmad data inspect` on the four real sets in ../shared/data (issue 2 acceptance: < 30 s in total).

Usage: python benchmarks/bench_inspect.py [--data ../shared/data] [--repeat 3] [--verify] [--out FILE.md]

Each set is inspected as a user would run it: a fresh `python -m vmad data inspect PATH --json`
process (interpreter start and imports included). Prints per-set wall times (the first run is the cold
one when the page cache is cold; the best of --repeat runs is also given) and the total, and optionally
writes them as a markdown section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine_description  # benchmarks/_machine.py

SETS = ("mvtec_ad/bottle", "magnetic_tile", "mpdd_metal_plate", "neu_seg")




def _time_inspect(path: Path, verify: bool) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "vmad", "data", "inspect", str(path), "--json"] + (
        ["--verify"] if verify else []
    )
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"inspect failed on {path}: {proc.stderr.strip()}")
    return elapsed, json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--verify", action="store_true", help="also decode every image and mask")
    parser.add_argument("--out", type=Path, help="write the figures as markdown to this file")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skip: {args.data} is absent")
        return 0
    rows, first_total, best_total = [], 0.0, 0.0
    for rel in SETS:
        times, counts = [], {}
        for _ in range(args.repeat):
            elapsed, counts = _time_inspect(args.data / rel, args.verify)
            times.append(elapsed)
        c = next(iter(counts["classes"].values()))
        first_total += times[0]
        best_total += min(times)
        rows.append((rel, counts["format"], c["normal"], c["anomalous"], times[0], min(times)))
        print(
            f"{rel:18s} {counts['format']:14s} normal {c['normal']:5d} anomalous {c['anomalous']:5d}  "
            f"first {times[0]:6.2f} s  best {min(times):6.2f} s",
            flush=True,
        )
    print(f"total: first runs {first_total:.2f} s, best runs {best_total:.2f} s")
    if args.out:
        command = "python benchmarks/bench_inspect.py" + (" --verify" if args.verify else "")
        lines = [
            f"## `vmad data inspect` on the four real sets{' (--verify)' if args.verify else ''}",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine_description()}",
            f"- command: `{command} --repeat {args.repeat}` (one `python -m vmad data inspect PATH --json` "
            "process per set and run)",
            "",
            "| set | format | normal | anomalous | first run (s) | best run (s) |",
            "|---|---|---|---|---|---|",
            *(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} |" for r in rows),
            f"| **total** | | | | **{first_total:.2f}** | **{best_total:.2f}** |",
            "",
        ]
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
