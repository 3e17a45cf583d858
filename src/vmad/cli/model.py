"""`vmad model` subcommands: ``summary`` (components, parameter counts, visual tokens; or, with ``--config``,
the resolved config of a YAML file), ``check`` (pre-flight checks of a preset: :mod:`vmad.model.check`) and
``export`` (merge LoRA and the trained token rows into a standalone
Hugging Face causal LM)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from vmad.errors import ConfigError, VMADError

# `vmad model add-prior` defaults (OURS): chosen on held-out surfaces built here, never on MVTec AD
# (benchmarks/make_heldout_textures.py, benchmarks/results/prior_weights_heldout.md)
DEFAULT_SKIP_WEIGHT = 8.0
DEFAULT_SCORE_WEIGHT = 0.0
DEFAULT_SCORE_SPACE = "logit"
DEFAULT_SKIP_OFFSET = 2.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect and export VMAD models")
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION")
    summary = actions.add_parser(
        "summary",
        help="components, parameter counts and visual tokens of a preset, or the resolved config of a file",
        description="Build a preset and print its components. --random-weights builds the same shapes on the "
        "meta device (no weights read, no memory used). --config FILE prints the config FILE resolves to "
        "(its preset, its overrides and any --set), without building the model. Nothing is downloaded.",
    )
    source = summary.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", default="small", help="a preset of vmad.model.build.PRESETS (default small)"
    )
    source.add_argument("--config", metavar="FILE", help="print the resolved config of this YAML file")
    summary.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --config: override a key by its dotted path, as `vmad train --set` (repeatable)",
    )
    summary.add_argument("--random-weights", action="store_true", help="shapes only (meta device)")
    summary.add_argument("--llava-path", help="paper preset: local LLaVA-1.5-7B folder (Hugging Face format)")
    summary.add_argument("--sam-path", help="paper preset: local SAM ViT-H folder (Hugging Face format)")
    summary.add_argument("--json", action="store_true", help="print JSON (--config: instead of YAML)")
    summary.set_defaults(func=_summary)
    check = actions.add_parser(
        "check",
        help="pre-flight check of a preset before a long training job",
        description="Build a preset from its local folders and check architecture, vocabulary, the <image> / "
        "<seg> ids and where the projector started from; then put one image through segment and a short "
        "generate, printing time and peak memory. Exit 0 when every check passes, 1 otherwise.",
    )
    check.add_argument(
        "--preset", default="paper", help="a preset of vmad.model.build.PRESETS (default: paper)"
    )
    check.add_argument("--llava-path", help="paper preset: local LLaVA-1.5-7B folder (Hugging Face format)")
    check.add_argument("--sam-path", help="paper preset: local SAM ViT-H folder (Hugging Face format)")
    check.add_argument("--image", help="an image to run (default: a seeded random 3:2 image)")
    check.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    check.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_check)
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
    _register_add_prior(actions)
    _register_add_refiner(actions)
    parser.set_defaults(func=lambda args: _usage(parser))


def _register_add_prior(actions: argparse._SubParsersAction) -> None:
    add_prior = actions.add_parser(
        "add-prior",
        help="give trained weights the normality-prior input (OURS, late fusion, no training)",
        description="Load a trained model, turn on mask_decoder.prior_prompt with the skip weight W "
        "(mask logits + W x the prior in standard units), the dense prior prompt at zero, the image "
        "score's prior weight A and the score space, and write the result to OUT. Without a prior (a single "
        "image, or prior off) OUT gives the input's masks; with score space 'logit' its image score is the "
        "score rule applied to the mask logits. A model that already takes a prior (the packaged small "
        "does) keeps its prior prompt; its W, K, A and score space are replaced.",
    )
    add_prior.add_argument("--model", default="small", help="packaged name or model folder (default small)")
    add_prior.add_argument("--skip-weight", type=float, default=DEFAULT_SKIP_WEIGHT, metavar="W",
                           help="logit units added per standard unit of the prior (default "
                           f"{DEFAULT_SKIP_WEIGHT:g}, chosen on held-out surfaces: "
                           "benchmarks/results/prior_weights_heldout.md)")
    add_prior.add_argument("--score-weight", type=float, default=DEFAULT_SCORE_WEIGHT, metavar="A",
                           help="image score: logit + A x (prior maximum - 3) (model.score.prior_weight; "
                           f"default {DEFAULT_SCORE_WEIGHT:g}, chosen the same way)")
    add_prior.add_argument("--score-space", choices=("probability", "logit"), default=DEFAULT_SCORE_SPACE,
                           help="model.score.space: 'logit' scores images and ranks maps by log-odds, which "
                           "the skip cannot saturate (default %(default)s)")
    add_prior.add_argument("--skip-offset", type=float, default=DEFAULT_SKIP_OFFSET, metavar="K",
                           help="the skip adds W x (prior - K): K standard units is the prior's neutral "
                           "point for the binary mask (mask_decoder.prior_skip_offset; default "
                           f"{DEFAULT_SKIP_OFFSET:g}, chosen by pooled pixel F1 on held-out surfaces and "
                           "in-domain splits; 0 = the earlier models, whose masks cover most of an image)")
    add_prior.add_argument("--out", required=True, help="output folder")
    add_prior.set_defaults(func=_add_prior)


def _register_add_refiner(actions: argparse._SubParsersAction) -> None:
    from vmad.train.refiner import RefinerTrainConfig

    d = RefinerTrainConfig()
    add = actions.add_parser(
        "add-refiner",
        help="train the full-resolution mask refiner (OURS) on a frozen model and write model + refiner",
        description="Load a trained model, turn on mask_decoder.refiner and train only the refiner "
        "(vmad.model.mask_refiner) on synthetic defects painted on the normal images under DATA (searched "
        "recursively; the model's own logits with the refiner off, a prior model with its self prior). "
        "Samples and checkpoints go to OUT/refiner-training/ and a run started again resumes there; the "
        "model is written to OUT (config.json + model.safetensors). A model that already has a refiner gets "
        "a new one. --defects adds real defects: annotated images with their ground-truth masks, given to "
        "the model in groups of one class (with the folder prior, as `vmad detect FOLDER`).",
    )
    add.add_argument("--model", default="small", help="packaged name or model folder (default small)")
    add.add_argument("--data", required=True, help="folder of normal images (any layout)")
    add.add_argument("--samples", type=int, default=d.samples, help="training samples (default %(default)s)")
    add.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    add.add_argument("--without-prior", type=float, default=d.without_prior, metavar="FRACTION",
                     help="a model with a normality prior: the share of samples whose logits are computed "
                     "without one (the rest with its self prior; default %(default)s)")
    add.add_argument("--defects", action="append", default=[], metavar="DATA",
                     help="an annotated data set (any format `vmad eval` reads) whose --defects-split images "
                     "real defects are drawn from (repeatable)")
    add.add_argument("--defects-split", default="train", metavar="SPLIT",
                     help="the split of each --defects set to use (default %(default)s; a set without it is "
                     "refused)")
    add.add_argument("--real-samples", type=int, default=None, metavar="N",
                     help="samples drawn from --defects, rounded up to whole groups of "
                     f"{d.real_group} images of one class (default 120 with --defects)")
    add.add_argument("--shrink-only", action="store_true",
                     help="the refiner may only lower logits (mask_decoder.refiner_shrink): its masks lie "
                     "within the decoder's")
    add.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    add.add_argument("--out", required=True, help="output folder")
    add.set_defaults(func=_add_refiner)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _paths(args: argparse.Namespace) -> dict[str, Any]:
    return {"llava_path": args.llava_path, "sam_path": args.sam_path}


def _summary(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _print_config(args)
    if args.overrides:
        raise ConfigError("--set needs --config")
    from vmad.model.build import build_vmad  # an unknown preset: ConfigError naming vmad.model.build.PRESETS

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


def _print_config(args: argparse.Namespace) -> int:
    """The training config ``args.config`` resolves to (preset + overrides + ``--set``), as YAML or JSON."""
    from vmad.train.config import load_train_config

    resolved = load_train_config(args.config, args.overrides).to_dict()
    if args.json:
        print(json.dumps(resolved, indent=2))
        return 0
    import yaml

    print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=110), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch

    from vmad.model.build import build_vmad
    from vmad.model.check import check_model, report_dict

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = None
    if args.image:
        from vmad.data.io import read_image

        image = torch.from_numpy(read_image(args.image)).permute(2, 0, 1).float() / 255.0
    start = time.perf_counter()
    model = build_vmad(args.preset, device=device, **_paths(args))
    build_seconds = time.perf_counter() - start
    report = check_model(model, image=image, tokens=args.tokens)
    report.timings["build_s"] = build_seconds
    if args.json:
        print(json.dumps(report_dict(report), indent=2))
        return 0 if report.ok else 1
    for item in report.checks:
        print(f"{'ok ' if item.ok else 'FAIL'} {item.name:<22} {item.detail}")
    times = "  ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in report.timings.items())
    memory = "  ".join(f"{k} {v:.0f} MiB" for k, v in report.peak_memory_mb.items())
    print(f"time: {times}\npeak memory: {memory}")
    return 0 if report.ok else 1


def _writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a Path; VMADError when it or a parent exists and is not a folder (checked before any
    model is loaded, so nothing is written)."""
    out = Path(path)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise VMADError(f"{out}: cannot {what} there ({blocked} exists and is not a folder)")
    return out


def _export(args: argparse.Namespace) -> int:
    from vmad.model.build import load_pretrained
    from vmad.model.weights_io import merge_lora

    out = _writable_folder(args.out, "export")
    model = load_pretrained(args.checkpoint, **_paths(args))
    model.save_trainable(out / "vmad")
    lm = merge_lora(model)
    lm.save_pretrained(out / "llm", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "llm")
    print(f"wrote {out / 'llm'} (merged language model) and {out / 'vmad'} (VMAD checkpoint)")
    return 0


def _add_prior(args: argparse.Namespace) -> int:
    import torch

    from vmad.model.build import build_vmad
    from vmad.model.config import VMADConfig
    from vmad.model.prior_prompt import SKIP_GAIN
    from vmad.model.weights_io import read_meta, resolve_model_path

    out = _writable_folder(args.out, "write the model")
    source = resolve_model_path(args.model)
    config = VMADConfig.from_dict(read_meta(source)["config"])
    before = config.mask_decoder
    if before.prior_prompt:  # e.g. the packaged small: its prior prompt is kept, the settings replaced
        print(f"{source} already takes a normality prior (skip weight {before.prior_skip_init}, skip offset "
              f"{before.prior_skip_offset}, score weight {config.score.prior_weight}, score space "
              f"{config.score.space}): replacing these settings")
    config.mask_decoder.prior_prompt, config.mask_decoder.prior_skip = True, True
    config.mask_decoder.prior_skip_init = args.skip_weight
    config.mask_decoder.prior_skip_offset = args.skip_offset
    config.score.prior_weight = args.score_weight
    config.score.space = args.score_space
    config.validate()
    model = build_vmad(config)
    model.load_trainable(source, keep_fresh=("mask_decoder.prior_prompt.",))
    with torch.no_grad():  # the skip weight W, also where the source had another
        model.mask_decoder.prior_prompt.skip_weight.fill_(args.skip_weight / SKIP_GAIN)
    model.save_trainable(out)
    print(f"wrote {out}: {source} + normality prior, skip weight {args.skip_weight}, skip offset "
          f"{args.skip_offset}, score weight {args.score_weight}, score space {args.score_space}")
    return 0


def _logits_of(det: Any) -> Any:
    """A detection's full-size mask logits (a model scoring probabilities: their log-odds)."""
    import numpy as np

    logits = det.full_logit_map()
    if logits is None:
        p = np.clip(det.full_probability_map().astype(np.float64), 1e-7, 1 - 1e-7)
        logits = np.log(p / (1 - p))
    return logits


def _add_refiner(args: argparse.Namespace) -> int:
    import numpy as np

    from vmad.infer.detector import Detector, DetectorConfig
    from vmad.model.build import build_vmad
    from vmad.model.config import VMADConfig
    from vmad.model.weights_io import read_meta, resolve_model_path
    from vmad.train.refiner import (
        RefinerTrainConfig,
        defect_samples,
        load_samples,
        normal_images,
        train_refiner,
    )

    if args.real_samples is not None and not args.defects:
        raise VMADError("--real-samples needs --defects DATA")
    real_samples = args.real_samples if args.real_samples is not None else 120 if args.defects else 0
    cfg = RefinerTrainConfig(samples=args.samples, steps=args.steps, seed=args.seed,
                             without_prior=args.without_prior, real_samples=real_samples,
                             defects=tuple(str(Path(d).resolve()) for d in args.defects),
                             defects_split=args.defects_split, shrink_only=args.shrink_only).validate()
    out = _writable_folder(args.out, "write the model")
    files = normal_images(args.data)
    real = defect_samples(list(cfg.defects), cfg.defects_split) if cfg.real_samples else None
    source = resolve_model_path(args.model)
    config = VMADConfig.from_dict(read_meta(source)["config"])
    config.mask_decoder.refiner = True
    config.mask_decoder.refiner_shrink = cfg.shrink_only
    config.validate()
    model = build_vmad(config)
    fresh = ("mask_refiner.",)
    model.load_trainable(source, keep_fresh=fresh, leave_out=fresh)
    prior = "self" if config.mask_decoder.prior_prompt else "off"
    detectors = {True: Detector(model, DetectorConfig(prior=prior, refine=False)),  # the decoder's logits
                 False: Detector(model, DetectorConfig(prior="off", refine=False))}

    def coarse(image: np.ndarray, with_prior: bool) -> np.ndarray:
        [det] = detectors[with_prior].detect([image])
        return _logits_of(det)

    folder = Detector(model, DetectorConfig(prior="folder", refine=False))

    def coarse_folder(images: list[np.ndarray]) -> list[np.ndarray]:
        return [_logits_of(det) for det in folder.detect(images)]

    work = out / "refiner-training"
    work.mkdir(parents=True, exist_ok=True)
    print(f"refiner: {len(files)} normal image(s) under {args.data}; {cfg.samples} samples, "
          f"{cfg.steps} steps")
    if real:
        print(f"refiner: {cfg.real_samples} real sample(s) from {len(real)} annotated image(s)")
    samples = load_samples(work, files, coarse, cfg, real=real, coarse_folder=coarse_folder)
    assert model.mask_refiner is not None
    train_refiner(model.mask_refiner, samples, cfg, work)
    model.save_trainable(out)
    real_note = f" + {len(samples) - cfg.samples} real" if real else ""
    print(f"wrote {out}: {source} + mask refiner ({cfg.steps} steps on {cfg.samples} synthetic{real_note} "
          "samples)")
    return 0
