"""Where the time of one segmentation-only pass goes, per image, at batch 1 and batch N: F_I + Ψ
(``encode_images``), the LLM forward, Γ + backbone + neck + mask decoder (``mask_logits``) and the image
score.

Usage (from the repository root):
    python benchmarks/profile_segment_parts.py [--model small] [--batches 1,8] [--rounds 2] [--side 384] \
        [--out benchmarks/results/batching_small_cpu.md]

Random images of ``--side`` px; each batch size is run ``--rounds`` times, alternating, after one untimed
run; the per-image milliseconds of each part are the median over the rounds. ``--out`` appends a record.
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

import torch
from _machine import machine_description  # benchmarks/_machine.py

from vmad.model.build import load_pretrained
from vmad.model.chat_format import tokenize_dialogues
from vmad.model.scoring import image_scores
from vmad.model.weights_io import resolve_model_path

QUESTION = (
    "Are there any abnormalities present in the bottle? If so, please output the defect segmentation result."
)
PARTS = ("encode", "llm", "mask", "score")


@torch.no_grad()
def parts(model, batch: int, side: int) -> tuple[dict[str, float], int]:  # noqa: ANN001
    """Per-image ms of each part for one batch; and the LLM sequence length."""
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
    times = {}
    start = time.perf_counter()
    encoded = model.encode_images(images)
    times["encode"] = time.perf_counter() - start
    enc = tokenize_dialogues(model.tokenizer, model.chat_format, [QUESTION] * batch,
                             [model.config.llm.seg_answer] * batch)  # fmt: skip
    seq = model.splice_images(enc["input_ids"], enc["attention_mask"], encoded)
    start = time.perf_counter()
    hidden = model.run_llm(seq.embeds, seq.attention, seq.position_ids())
    times["llm"] = time.perf_counter() - start
    h_seg = hidden[torch.arange(batch), model.seg_positions(seq.ids)]
    start = time.perf_counter()
    logits = model.mask_logits(encoded, h_seg, (side, side))
    times["mask"] = time.perf_counter() - start
    start = time.perf_counter()
    image_scores(logits.sigmoid(), model.config.score)
    times["score"] = time.perf_counter() - start
    return {k: 1000.0 * v / batch for k, v in times.items()}, int(seq.ids.shape[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    model = load_pretrained(resolve_model_path(args.model), device="cpu").eval()
    for b in batches:
        parts(model, b, args.side)  # untimed
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in batches}
    length = 0
    for _ in range(args.rounds):
        for b in batches:
            result, length = parts(model, b, args.side)
            runs[b].append(result)
    rows = []
    for b in batches:
        ms = {k: statistics.median(r[k] for r in runs[b]) for k in PARTS}
        rows.append(f"| {b} | " + " | ".join(f"{ms[k]:.0f}" for k in PARTS) + f" | {sum(ms.values()):.0f} |")
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/profile_segment_parts.py " + shlex.join(given)
    lines = [
        f"## Segmentation-only pass by part, per image: `{args.model}` at {args.side} px, batch "
        f"{' vs '.join(map(str, batches))}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}, no GPU; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at start {load_start}, at end {load_end}",
        f"- command: `{command.strip()}`; LLM sequence: {length} tokens per image; median of "
        f"{args.rounds} rounds",
        "",
        "| batch | F_I + Ψ (ms/img) | LLM forward (ms/img) | backbone + neck + decoder (ms/img) "
        "| score (ms/img) | total (ms/img) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended the record to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
