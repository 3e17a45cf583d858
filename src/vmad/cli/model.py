"""`vmad model` subcommands: ``summary`` (components, parameter counts, visual tokens) and ``export``
(merge LoRA and the trained token rows into a standalone Hugging Face causal LM)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PRESET_CHOICES = ("tiny", "small", "paper")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect and export VMAD models")
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION")
    summary = actions.add_parser(
        "summary",
        help="components, parameter counts and visual tokens of a preset",
        description="Build a preset and print its components. --random-weights builds the same shapes on the "
        "meta device (no weights read, no memory used). Nothing is downloaded.",
    )
    summary.add_argument("--preset", choices=PRESET_CHOICES, default="small")
    summary.add_argument("--random-weights", action="store_true", help="shapes only (meta device)")
    summary.add_argument("--llava-path", help="paper preset: local LLaVA-1.5-7B folder (Hugging Face format)")
    summary.add_argument("--sam-path", help="paper preset: local SAM ViT-H folder (Hugging Face format)")
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(func=_summary)
    export = actions.add_parser(
        "export",
        help="merge LoRA into the LLM of a trained checkpoint",
        description="Load a checkpoint written by VMADModel.save_trainable, merge LoRA and the trained "
        "token rows into the language model and write OUT/llm (save_pretrained + tokenizer) and OUT/vmad "
        "(the checkpoint).",
    )
    export.add_argument("checkpoint", help="folder with model.safetensors + config.json")
    export.add_argument("out", help="output folder")
    export.add_argument("--llava-path")
    export.add_argument("--sam-path")
    export.set_defaults(func=_export)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _paths(args: argparse.Namespace) -> dict[str, Any]:
    return {"llava_path": args.llava_path, "sam_path": args.sam_path}


def _summary(args: argparse.Namespace) -> int:
    from vmad.model.build import build_vmad

    start = time.perf_counter()
    model = build_vmad(args.preset, random_weights=args.random_weights, **_paths(args))
    info = model.summary()
    info["random_weights"] = bool(args.random_weights)
    if args.random_weights and args.preset != "tiny":
        # The real tokenizer is not read in this mode (an in-code one stands in), so the ids of the added
        # tokens would not be the real model's: leave them out rather than report wrong ones.
        for key in ("new_tokens", "seg_token_id", "image_token_id"):
            info[key] = None
        info["note"] = "random weights: shapes and parameter counts only; token ids need the real tokenizer"
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"preset: {info['preset']}   visual tokens: {info['visual_tokens']} "
        f"(from {info['encoder_tokens']})   "
        f"random weights: {info['random_weights']}"
    )
    print(f"{'component':<16} {'parameters':>15} {'trainable':>15}")
    for name, c in info["components"].items():
        note = f"  (shared with {c['shared_with']})" if "shared_with" in c else ""
        print(f"{name:<16} {c['parameters']:>15,} {c['trainable']:>15,}{note}")
    print(f"{'total':<16} {info['total_parameters']:>15,} {info['trainable_parameters']:>15,}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vmad.model.vmad import VMADModel

    model = VMADModel.from_pretrained(args.checkpoint, **_paths(args))
    out = Path(args.out)
    model.save_trainable(out / "vmad")
    lm = model.merge_lora()
    lm.save_pretrained(out / "llm", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "llm")
    print(f"wrote {out / 'llm'} (merged language model) and {out / 'vmad'} (VMAD checkpoint)")
    return 0
