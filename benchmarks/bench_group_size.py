"""Peak memory and wall time of `vmad detect FOLDER` against the folder's size, with and without the
interleaved groups of `--group-size` (the normality prior of the packaged small, or `--baseline musc`, scores
the images of a folder against each other).

Usage: python benchmarks/bench_group_size.py [--sizes 100 400] [--group-sizes 200 0] [--side 1024]
[--baseline] [--out FILE.md]

For each folder size N a folder of N synthetic textured RGB images of SIDE x SIDE pixels is written to a
temporary folder (striped patterns with noise, one in ten with a painted spot; the content does not matter
here); then for each group size G a fresh process runs `vmad detect FOLDER --no-answer --no-progress
--group-size G` (the packaged small, or MuSc with `--baseline`) and the peak resident memory of that process
(`getrusage` of the waited child) and its wall time are recorded. Prints a table and with `--out` writes a
markdown record (date, machine, command, figures).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _machine import write_report  # benchmarks/_machine.py
from PIL import Image

#: measures one command in a process of its own: its children's peak RSS is then that command's
_MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
    "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def write_folder(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` PNG images of one striped texture with noise; every tenth gets a bright spot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    base = 127 + 50 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    for i in range(n):
        image = np.repeat(base[:, :, None], 3, axis=2) + rng.normal(0, 6, (side, side, 3))
        if i % 10 == 3:
            y, x = rng.integers(side // 8, side - side // 4, 2)
            image[y : y + side // 10, x : x + side // 10] = (235, 60, 40)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")


def measure(folder: Path, out: Path, group_size: int, baseline: bool) -> tuple[int, float, float]:
    """``(exit status, wall seconds, peak RSS in MiB)`` of one `vmad detect` run in a fresh process."""
    method = ["--baseline", "musc"] if baseline else ["--no-answer"]
    cmd = [sys.executable, "-m", "vmad", "detect", str(folder), "--out", str(out), *method, "--no-progress",
           "--group-size", str(group_size)]
    line = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, wall, rss_kib = line.stdout.split()
    return int(rc), float(wall), int(rss_kib) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="folder sizes (images)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[200, 0],
                        help="--group-size values to compare (0 = the whole folder at once)")
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--baseline", action="store_true", help="--baseline musc instead of the small model")
    parser.add_argument("--out", type=Path, help="markdown file to write")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"in{n}"
            folder.mkdir()
            write_folder(folder, n, args.side)
            for g in args.group_sizes:
                rc, wall, rss = measure(folder, Path(tmp) / f"out{n}_{g}", g, args.baseline)
                cells = [str(n), str(g), str(rc), f"{wall:.1f}", f"{wall / n:.3f}", f"{rss:.0f}"]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    if args.out:
        details = [
            f"- method: {'--baseline musc' if args.baseline else 'the packaged small, --no-answer'}; images: "
            f"synthetic {args.side}x{args.side} RGB PNG textures (benchmarks/bench_group_size.py)",
            "- each run a fresh process; peak RSS = `getrusage(RUSAGE_CHILDREN).ru_maxrss` of the waited "
            "`vmad detect` process; wall time includes loading the model",
        ]
        head = ["images", "--group-size", "exit", "wall s", "s / image", "peak RSS MiB"]
        write_report(args.out, "vmad detect on a large folder: --group-size", details, head, rows,
                     ["--group-size 0 = the whole folder at once (the behaviour before --group-size)."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
