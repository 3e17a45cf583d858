"""``vmad bench``: inference speed of a VMAD model against the stock LLaVA + SAM pipeline, in the same run on
the same device (what is measured: :mod:`vmad.eval.speed`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vmad.model.vmad import VMADModel


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed: segmentation ms/image, images/s, decode tokens/s, memory; against stock LLaVA + SAM",
        description="Time a VMAD model (segmentation only at batch 1 and at several batch sizes, greedy "
        "decoding, peak memory) and, in the same run on the same device, the stock pipeline a user would "
        "otherwise chain: transformers' LlavaForConditionalGeneration + SamModel with random weights at the "
        "same shapes (scaled-down members of the same families where the model has no CLIP / SAM; the output "
        "says which). With --device cuda the GPU fast path is on (bf16, SDPA, static KV cache + "
        "torch.compile); the CPU path is the plain one.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="small|PATH", help="packaged model or checkpoint (default: small)")
    which.add_argument("--preset", choices=("tiny", "small", "paper"), help="build a preset instead")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --preset: random weights at the preset's shapes (paper: no local LLaVA / SAM folders)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", metavar="FILE.md", help="append a Markdown record (date, machine, command)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="square test image side (default: the "
                        "model's largest input side)")  # fmt: skip
    parser.add_argument("--batches", default=None, metavar="B,B,...",
                        help="batch sizes to try (default 1,2,4,8 on CPU; 1,8,16,32,64 on CUDA)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10, help="timed batch-1 runs (10)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed runs per batch size (3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (2)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens (32)")
    parser.add_argument("--no-stock", action="store_true", help="time VMAD only")
    parser.add_argument("--no-fast-path", action="store_true", help="on CUDA: the plain path (fp32 parts, "
                        "dynamic cache, eager)")  # fmt: skip
    parser.add_argument("--threads", type=int, metavar="T", help="torch.set_num_threads(T)")
    parser.set_defaults(func=run)


def _batches(text: str | None, device: torch.device) -> tuple[int, ...]:
    from vmad.errors import ConfigError

    if text is None:
        return (1, 8, 16, 32, 64) if device.type == "cuda" else (1, 2, 4, 8)
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--batches {text!r}: expected integers separated by commas") from None


def _load(args: argparse.Namespace, device: torch.device) -> tuple[VMADModel, str]:
    """The model to time and its label."""
    import contextlib

    import torch

    from vmad.errors import ConfigError

    if args.random_weights and args.preset is None:
        raise ConfigError("--random-weights needs --preset")
    if args.preset is not None:
        from vmad.model.build import build_vmad

        where = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with where:  # large random models are created on the GPU directly
            model = build_vmad(args.preset, random_weights=args.random_weights, on_meta=False, device=device)
        weights = "random weights" if args.random_weights or args.preset == "tiny" else "pretrained parts"
        return model.eval(), f"preset {args.preset} ({weights})"
    from vmad.model.build import load_pretrained
    from vmad.model.weights_io import resolve_model_path

    ref = args.model or "small"
    return load_pretrained(resolve_model_path(ref), device=device).eval(), f"model {ref}"


def _command(args: argparse.Namespace) -> str:
    """The command line these options amount to (for the record)."""
    parts = ["vmad", "bench"]
    for name in ("model", "preset", "device", "image_size", "batches", "repeats", "batch_repeats", "warmup",
                 "tokens", "threads"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    for flag in ("random_weights", "no_stock", "no_fast_path", "json"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')}")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from vmad.errors import ConfigError
    from vmad.eval.speed import BenchSettings, markdown_record, run_bench, summary_rows
    from vmad.infer.detector import check_device_available

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {args.device!r}: {exc}") from None
    check_device_available(device, args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = BenchSettings(
        image_size=args.image_size, batches=_batches(args.batches, device), warmup=args.warmup,
        repeats=args.repeats, batch_repeats=args.batch_repeats, tokens=args.tokens, stock=not args.no_stock,
    ).validate()  # fmt: skip
    model, label = _load(args, device)
    fast: dict[str, Any] | None = None
    if device.type == "cuda" and not args.no_fast_path:
        from vmad.model.fastpath import enable_fast_path

        fast = enable_fast_path(model)
    result = run_bench(model, label, settings, fast)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(markdown_record(result, _command(args)) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{label} on {result['device']}, {result['image_size']} px images")
        for name, vmad, stock in summary_rows(result):
            print(f"  {name:<58} vmad {vmad:>10}   stock {stock:>10}")
        if args.out:
            print(f"appended the record to {args.out}")
    return 0
