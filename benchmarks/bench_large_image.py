"""Peak memory of `vmad detect` on a 12000 x 12000 PNG (issue 15 item 3: the image-size guard).

Usage: python benchmarks/bench_large_image.py [--size 12000] [--model small] [--max-pixels N] [--answer]
[--out FILE.md]

Writes a SIZE x SIZE RGB PNG (flat grey with one darker square, so the file is small) into a temporary
folder, runs ``vmad detect IMAGE --model MODEL --no-answer --no-progress --json --out TMP/out`` in a
subprocess (``--answer`` drops ``--no-answer``; ``--max-pixels`` is passed on when given) and measures the
peak resident set size of that subprocess (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it
ends: this script starts no other child first). Prints the peak (MB), the wall time and what summary.json
says about the image, and writes a markdown record (date, machine, command, figures) to ``--out``
(default benchmarks/results/large_image_detect.md; it is replaced).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import machine_description  # benchmarks/_machine.py
from PIL import Image

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "large_image_detect.md"


def write_png(path: Path, size: int) -> None:
    arr = np.full((size, size, 3), 128, dtype=np.uint8)
    q = size // 8
    arr[3 * q : 4 * q, 3 * q : 4 * q] = (90, 60, 60)
    Image.fromarray(arr).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--model", default="small")
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--answer", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vmad-large-") as tmp:
        image = Path(tmp) / f"flat_{args.size}.png"
        write_png(image, args.size)
        file_mb = image.stat().st_size / 1e6
        cmd = [sys.executable, "-m", "vmad", "detect", str(image), "--model", args.model, "--no-progress",
               "--json", "--out", str(Path(tmp) / "out")]
        if not args.answer:
            cmd.append("--no-answer")
        if args.max_pixels is not None:
            cmd += ["--max-pixels", str(args.max_pixels)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"vmad detect failed (exit {proc.returncode}); peak RSS {peak_mb:.0f} MB", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout)["images"][0]
        mask = Image.open(Path(tmp) / "out" / row["mask"])
        mask_size = f"{mask.width}x{mask.height}"

    shown = " ".join(shlex.quote(c) for c in ["vmad", *cmd[3:]]).replace(str(Path(tmp)), "$TMP")
    lines = [
        f"peak RSS of the vmad detect subprocess: {peak_mb:.0f} MB",
        f"wall time: {wall:.1f} s",
        f"image: {args.size}x{args.size} PNG, {file_mb:.2f} MB on disk",
        f"summary.json: downscaled={row['downscaled']}, processed_size={row['processed_size']}, "
        f"height x width = {row['height']} x {row['width']}, score {row['score']}",
        f"mask PNG written: {mask_size}",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# `vmad detect` peak memory on a large image (issue 15 item 3)\n\n"
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
        f"- machine: {machine_description()}\n"
        f"- benchmark: `python benchmarks/bench_large_image.py {' '.join(argv or sys.argv[1:])}`\n"
        f"- measured command: `{shown}`\n"
        "- peak = `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after the subprocess ends\n\n"
        + "".join(f"- {line}\n" for line in lines),
        encoding="utf-8",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
