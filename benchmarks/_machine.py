"""The machine line every benchmark records beside its figures, and the Markdown report the evaluation
comparisons write (title, date, machine, command, details, one table, notes)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path


def machine_description() -> str:
    """CPU model, logical CPUs, OS and Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def write_report(out: Path, title: str, details: list[str], head: list[str], rows: list[str],
                 notes: list[str]) -> None:
    """Write ``out``: ``# title``, date / machine / command lines, ``details`` (Markdown list lines), a table
    with ``head`` (first two columns left-aligned) and the already formatted ``rows``, then ``notes``."""
    text = [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}, no GPU",
        f"- command: `python {shlex.join(sys.argv)}`",
        *details,
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
        *rows,
        "",
        *notes,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    print(f"wrote {out}")
