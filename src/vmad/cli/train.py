"""`vmad train CONFIG [--set key=value ...] [--resume] [--overwrite]`: train VMAD (docs/training.md).

CONFIG is a YAML file or the name of a config shipped in the package (``tiny``, ``small``, ``paper``,
``vmad_small``, ``vmad_small_stage2``; ``vmad train --list-configs`` prints them with their paths). On several
GPUs: ``accelerate launch --config_file $(vmad train --config-path accelerate/ddp) -m vmad train paper``.
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
        nargs="?",
        help="a YAML file naming a model preset and its overrides, or the name of a packaged one (tiny, "
        "small, paper, vmad_small, vmad_small_stage2; --list-configs); `vmad model summary --config CONFIG` "
        "prints what it resolves to",
    )
    parser.add_argument(
        "--list-configs", action="store_true", help="print the packaged configs' names and paths, then exit"
    )
    parser.add_argument(
        "--config-path", metavar="NAME", help="print a packaged config's path (e.g. accelerate/ddp) and exit"
    )
    parser.add_argument(
        "--mask-name",
        metavar="TEMPLATE",
        help="folder-format data: mask file name template (= --set data.options.folder.mask_name=...)",
    )
    parser.add_argument(
        "--data-opt",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="a reader option, as `vmad data inspect --data-opt` (= --set data.options.SECTION.FIELD=...)",
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


def data_overrides(mask_name: str | None, pairs: list[str]) -> list[str]:
    """``--mask-name`` / ``--data-opt`` as ``--set data.options...`` overrides (values quoted as JSON
    strings, so ``{stem}_mask.png`` is not read as YAML)."""
    import json

    from vmad.data.dataset import data_options

    data_options(mask_name, pairs)  # checks keys and values, with the messages of `vmad data`
    out = [f"data.options.folder.mask_name={json.dumps(mask_name)}"] if mask_name is not None else []
    for pair in pairs:
        key, _, value = pair.partition("=")
        out.append(f"data.options.{key.strip()}={json.dumps(value.strip())}")
    return out


def _train(args: argparse.Namespace) -> int:
    from vmad.errors import ConfigError
    from vmad.train.config import load_train_config, packaged_configs, resolve_config_path

    if args.list_configs:
        for name, path in packaged_configs().items():
            print(f"{name}\t{path}")
        return 0
    if args.config_path:
        print(resolve_config_path(args.config_path))
        return 0
    if args.config is None:
        raise ConfigError("give a config: a YAML file or a packaged name (vmad train --list-configs)")
    from vmad.train.trainer import train

    overrides = data_overrides(args.mask_name, args.data_opt) + list(args.overrides)
    overrides += ["train.progress=false"] if args.no_progress else []
    cfg = load_train_config(args.config, overrides)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.final_dir is None:
        print(f"stopped at step {result.step}/{result.total_steps}; resume with --resume")
    else:
        print(f"trained {result.step} steps; weights in {result.final_dir}, log {result.log_path}")
    return 0
