"""`vmad train CONFIG.yaml [--set key=value ...] [--resume] [--overwrite]`: train VMAD (docs/training.md).

On several GPUs: ``accelerate launch --config_file configs/accelerate/ddp.yaml -m vmad train CONFIG.yaml``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train VMAD from a YAML config",
        description="Train VMAD (LoRA LLM, LTC projector, <seg> head, mask decoder, DSSL) by the config. "
        "Writes OUTPUT_DIR/log.jsonl, OUTPUT_DIR/checkpoint-<step>/ and OUTPUT_DIR/final/. Nothing is "
        "downloaded.",
    )
    parser.add_argument(
        "config",
        help="YAML file naming a model preset and its overrides (configs/tiny.yaml, configs/small.yaml, "
        "configs/paper.yaml); `vmad model summary --config FILE` prints what it resolves to",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by its dotted path, value parsed as YAML and converted to the key's type "
        "(repeatable), e.g. --set data.root=DIR --set train.max_steps=40",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in output_dir"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run already in output_dir and start again"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from vmad.train.config import load_train_config
    from vmad.train.trainer import train

    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    cfg = load_train_config(args.config, overrides)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.final_dir is None:
        print(f"stopped at step {result.step}/{result.total_steps}; resume with --resume")
    else:
        print(f"trained {result.step} steps; weights in {result.final_dir}, log {result.log_path}")
    return 0
