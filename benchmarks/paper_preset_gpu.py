"""The paper preset at full shape on one GPU with random bf16 weights: inference time and memory, and the time
and memory of a LoRA + DSSL training step at the paper's batch size under DeepSpeed ZeRO-2 with bf16.

Usage (GPU machine, H100/H200; needs the CUDA build of torch and ``pip install -e ".[deepspeed]"``):
    python benchmarks/paper_preset_gpu.py --out benchmarks/results/paper_preset_gpu.md [--json FIGS.json]
CPU smoke test of the same code path with the tiny preset (results only under /tmp):
    python benchmarks/paper_preset_gpu.py --preset tiny --device cpu [--deepspeed] --out /tmp/smoke.md

What runs:

(a) inference. ``vmad.model.build.build_vmad(preset, random_weights=True, on_meta=False)`` built directly on
    the device (LLaVA-1.5-7B text model + CLIP ViT-L/14-336 + LTC + SAM ViT-H shapes, no download, no local
    folders); the LLM is cast to the preset's ``llm.dtype`` (bf16) by the builder and, as
    ``from_pretrained(dtype=bf16)`` would load them, the CLIP vision tower and the SAM image encoder are cast
    to it here too (Ψ, Γ and the mask decoder stay float32, as in a model built from the local folders). One
    seeded random image at the training input side (1024 px for the paper preset) goes through
    ``model.segment`` and a 32-token ``model.generate`` (batch 1, greedy, end-of-answer tokens suppressed so
    exactly ``--tokens`` tokens are decoded), ``--warmup`` untimed runs then ``--repeats`` timed ones
    (``torch.cuda.synchronize`` around each); median, min, max and ``torch.cuda.max_memory_allocated``.
(b) training. ``vmad.train.trainer.Trainer`` with the TrainConfig of ``configs/<preset>.yaml``
    (``load_train_config``; LoRA, DSSL with its memory prefill, the paper's batch 2 per GPU, AdamW over the
    trained parts, clipping) and ``accelerate.Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2),
    mixed_precision="bf16")``, on a synthetic RIAD dataset written to a temporary folder (``--train-images``
    images at the training input side, half with a square defect). The Trainer has no random-weights option
    (it calls ``build_vmad(cfg.model)``, which needs ``model.llava_path`` / ``model.sam_path``), so while it
    is constructed this script substitutes ``vmad.model.build.build_vmad`` with the random-weights build of
    (a); everything else is the Trainer's own code: ``_prefill`` (DSSL memory) and ``_optimizer_step`` as
    ``fit`` calls them (no checkpoints written). ``--train-warmup`` steps untimed, then ``--train-steps``
    timed; peak memory over the timed steps (allocated and reserved), and whether it fits a 24 GB card.
(c) a Markdown record (``--out``: date, machine with GPU name and torch / CUDA versions, command, figures)
    and, with ``--json PATH`` (``-`` = stdout), the figures as JSON.

Random weights make the answers and masks meaningless; time and memory do not depend on the values. Without a
CUDA GPU (``--device cuda``, the default) the script exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import machine_description  # noqa: E402  (benchmarks/_machine.py)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "paper_preset_gpu.md"
GIB = 2**30
CARD_GIB = 24.0  # the paper trains on 24 GB cards
CONTEXT_GIB = 0.5  # CUDA context and cuBLAS workspace, outside the caching allocator (rough)
QUESTION = (
    "Are there any abnormalities present in the plate? If so, please output the defect segmentation result."
)
ANSWERS = {
    "description": "A bright square stain lies on the surface.",
    "impact": "It spoils the surface finish.",
    "suggestion": "Clean the part and check the line.",
}


# ----------------------------------------------------------------------------------------------- helpers
def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset (GiB): on CUDA allocated and reserved by the caching allocator; on the
    CPU the process's peak resident set (ru_maxrss, never reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    return {"process_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB}


def _allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> tuple[list[float], Any]:
    """``warmup`` untimed calls, then ``repeats`` timed ones (synchronised); the times and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def summary_of(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def _dtypes(model: torch.nn.Module) -> dict[str, str]:
    """The dtype(s) of each top-level part's floating-point parameters."""
    out = {}
    for name, child in model.named_children():
        kinds = sorted(
            {str(p.dtype).removeprefix("torch.") for p in child.parameters() if p.is_floating_point()}
        )
        if kinds:
            out[name] = "/".join(kinds)
    return out


# ----------------------------------------------------------------------------------------------- building
def build_random(cfg: Any, device: torch.device, **kwargs: Any) -> Any:
    """``build_vmad(cfg, random_weights=True, on_meta=False)`` with the parameters created on ``device``
    directly (no 28 GB float32 copy of the 7B LLM in host memory); the vision tower and SAM image encoder
    then cast to ``llm.dtype``, as ``from_pretrained(dtype=...)`` loads them from the local folders."""
    from vmad.model import build
    from vmad.model.llm import DTYPES

    build_vmad = getattr(build_random, "original", build.build_vmad)
    kwargs.update(random_weights=True, on_meta=False, device=device)
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        model = build_vmad(cfg, **kwargs)
    c = model.config
    dtype = DTYPES[c.llm.dtype]
    if c.llm.kind == "llava":  # LlavaForConditionalGeneration.from_pretrained(dtype=...) loads CLIP in it
        model.vision_encoder.to(dtype)
    if c.backbone.kind == "sam" and model.visual_backbone is not None:  # SamModel.from_pretrained(dtype=...)
        model.visual_backbone.to(dtype)
    return model


@contextlib.contextmanager
def random_weights_for_trainer(device: torch.device) -> Iterator[dict[str, int]]:
    """While active, ``vmad.model.build.build_vmad`` (what the Trainer calls) is :func:`build_random`;
    yields a counter of the calls, so the caller can check that the Trainer did use it."""
    from vmad.model import build

    original, calls = build.build_vmad, {"n": 0}

    def patched(cfg: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return build_random(cfg, device, **kwargs)

    build_random.original = original  # type: ignore[attr-defined]
    build.build_vmad = patched
    try:
        yield calls
    finally:
        build.build_vmad = original
        del build_random.original  # type: ignore[attr-defined]


def write_riad(root: Path, size: int, count: int, classes: tuple[str, ...] = ("plate", "tile")) -> Path:
    """A synthetic RIAD-format dataset (docs/riad_format.md; as tests/vmad_testing.py's ``write_riad``):
    ``count`` ``size`` x ``size`` images over ``classes``, every second one with a bright square defect."""
    from PIL import Image

    rng = np.random.default_rng(0)
    manifest: dict[str, Any] = {"format": "riad", "version": 1, "classes": {}}
    side = max(4, size // 4)
    for c, name in enumerate(classes):
        cdir = root / name
        (cdir / "images").mkdir(parents=True)
        manifest["classes"][name] = {"normal_description": f"A clean {name} with an even grey surface."}
        images, anns = [], []
        for i in range(c, count, len(classes)):
            arr = (rng.random((size, size, 3)) * 60 + 90).astype(np.uint8)
            entry: dict[str, Any] = {
                "id": i + 1,
                "file_name": f"images/{i:03d}.png",
                "width": size,
                "height": size,
            }
            if (i // len(classes)) % 2:
                x, y = (int(v) for v in rng.integers(1, size - side - 1, 2))
                arr[y : y + side, x : x + side] = 250
                poly = [x, y, x + side, y, x + side, y + side, x, y + side]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": 1,
                        "iscrowd": 0,
                        "segmentation": [poly],
                        "bbox": [x, y, side, side],
                        "area": side * side,
                    }
                )
                entry.update(label="anomalous", defect_type="stain", answers=ANSWERS)
            else:
                entry.update(label="normal", answers=None)
            Image.fromarray(arr).save(cdir / entry["file_name"])
            images.append(entry)
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "stain"}]}
        (cdir / "annotations_train.json").write_text(json.dumps(coco))
    (root / "classes.json").write_text(json.dumps(manifest))
    return root


# --------------------------------------------------------------------------------------------- (a) inference
@contextlib.contextmanager
def no_stop_tokens() -> Iterator[None]:
    """Greedy decoding never stops early (``vmad.model.generation.stop_token_ids`` returns no ids)."""
    from vmad.model import generation

    original = generation.stop_token_ids
    generation.stop_token_ids = lambda tokenizer, fmt: set()
    try:
        yield
    finally:
        generation.stop_token_ids = original


def run_inference(
    args: argparse.Namespace, cfg: Any, device: torch.device, image_size: int
) -> dict[str, Any]:
    _reset_peak(device)
    t0 = time.perf_counter()
    model = build_random(cfg, device).eval()
    _sync(device)
    build_s = time.perf_counter() - t0
    build_peak = _peak(device)
    info = model.summary()
    dtypes = _dtypes(model)
    resident = _allocated(device)
    _say(
        f"[inference] built {cfg.preset} with random weights on {device} in {build_s:.1f} s: "
        f"{_count(info['total_parameters'])} parameters ({_count(info['trainable_parameters'])} trained), "
        f"{info['visual_tokens']} visual tokens; dtypes {dtypes}"
        + (f"; {resident:.2f} GiB allocated" if resident is not None else "")
    )
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)

    _reset_peak(device)
    seg_times, seg = timed(lambda: model.segment(image, QUESTION), args.warmup, args.repeats, device)
    seg_peak = _peak(device)
    segment = {
        **summary_of(seg_times),
        "peak": seg_peak,
        "mask_shape": list(seg.probs.shape),
        "score": float(seg.scores[0]),
        "finite": bool(torch.isfinite(seg.probs).all()),
    }
    _say(
        f"[inference] segment (1 image {image_size}x{image_size}): median {segment['median_s']:.4f} s "
        f"(min {segment['min_s']:.4f}, max {segment['max_s']:.4f}, {args.repeats} runs after {args.warmup} "
        f"warm-up); peak {_fmt_peak(seg_peak)}; mask {tuple(seg.probs.shape)}"
    )

    _reset_peak(device)
    with no_stop_tokens():
        gen_times, gen = timed(
            lambda: model.generate(image, QUESTION, max_new_tokens=args.tokens),
            args.warmup,
            args.repeats,
            device,
        )
    gen_peak = _peak(device)
    n_tokens = len(gen.token_ids[0])
    generate = {
        **summary_of(gen_times),
        "peak": gen_peak,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / statistics.median(gen_times),
        "emitted_seg": gen.probs[0] is not None,
    }
    _say(
        f"[inference] generate ({n_tokens} tokens, greedy, KV cache): median {generate['median_s']:.4f} s "
        f"= {generate['tokens_per_s']:.1f} tokens/s incl. prefill (min {generate['min_s']:.4f}, max "
        f"{generate['max_s']:.4f}); peak {_fmt_peak(gen_peak)}; <seg> emitted: {generate['emitted_seg']}"
    )
    return {
        "build_s": build_s,
        "total_parameters": info["total_parameters"],
        "trainable_parameters": info["trainable_parameters"],
        "visual_tokens": info["visual_tokens"],
        "dtypes": dtypes,
        "resident_gib": resident,
        "build_peak": build_peak,
        "image_size": image_size,
        "question": QUESTION,
        "segment": segment,
        "generate": generate,
    }


def _failure(phase: str, exc: BaseException) -> str:
    """Print the traceback of a failed phase; its one-line description for the record."""
    traceback.print_exc()
    line = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    _say(f"[{phase}] FAILED: {line}")
    return line


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt_peak(peak: dict[str, float]) -> str:
    if "allocated_gib" in peak:
        return f"{peak['allocated_gib']:.2f} GiB allocated / {peak['reserved_gib']:.2f} GiB reserved"
    return f"{peak['process_rss_gib']:.2f} GiB process RSS (since start)"


# ---------------------------------------------------------------------------------------------- (b) training
def fits_card(peak: dict[str, float]) -> str | None:
    """Whether a peak fits a 24 GB card (24 GiB less ~0.5 GiB of CUDA context), judged by the reserved
    memory (what the caching allocator holds); None on the CPU."""
    if "reserved_gib" not in peak:
        return None
    budget = CARD_GIB - CONTEXT_GIB
    if peak["reserved_gib"] <= budget:
        return "yes"
    if peak["allocated_gib"] <= budget:
        return "tight (allocated fits, reserved does not: allocator fragmentation decides)"
    return "no"


def run_training(
    args: argparse.Namespace, device: torch.device, image_size: int, tmp: Path
) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from vmad.train.config import load_train_config
    from vmad.train.trainer import Trainer

    data = write_riad(tmp / "riad", image_size, args.train_images)
    total = args.train_warmup + args.train_steps
    overrides = {
        "data.root": str(data),
        "data.num_workers": 0,
        "output_dir": str(tmp / "run"),
        "train.max_steps": total,
        "train.batch_size": args.batch_size,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.progress": "false",
        "train.dssl": "true",
    }
    cfg = load_train_config(args.config, [f"{k}={v}" for k, v in overrides.items()] + list(args.set))
    if args.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        # no cpu=True here: it would make Accelerate skip DeepSpeed (DS_ACCELERATOR=cpu selects the CPU)
        accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(zero_stage=2), mixed_precision=args.mixed_precision
        )
        engine = f"DeepSpeed {_version('deepspeed')} ZeRO-2, mixed precision {args.mixed_precision}"
    else:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            cpu=device.type == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        engine = f"Accelerate (no DeepSpeed), mixed precision {args.mixed_precision}"
    if accelerator.device.type != device.type:
        raise SystemExit(f"error: Accelerate chose {accelerator.device}, asked for {device}")

    _free(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    with random_weights_for_trainer(accelerator.device) as calls:
        trainer = Trainer(cfg, accelerator=accelerator)
    _sync(device)
    setup_s = time.perf_counter() - t0
    if calls["n"] != 1:
        raise SystemExit(
            f"error: the Trainer built its model {calls['n']} times through build_vmad, expected 1"
        )
    wrapper = type(trainer.wrapped).__name__
    if args.deepspeed and not (trainer.deepspeed and wrapper == "DeepSpeedEngine"):
        raise SystemExit(f"error: DeepSpeed was asked for, but accelerator.prepare returned a {wrapper}")
    setup_peak = _peak(device)
    trained = sum(p.numel() for p in trainer.training_module.parameters() if p.requires_grad)
    dtypes = _dtypes(trainer.model)
    _say(
        f"[train] {engine}; Trainer built (random-weights model, optimizer, accelerator.prepare -> "
        f"{wrapper}) in {setup_s:.1f} s; {_count(trained)} trained parameters (LoRA r={cfg.model.lora.r}, "
        f"DSSL heads incl.); dtypes {dtypes}; batch {cfg.train.batch_size}, {len(trainer.dataset)} "
        f"synthetic images {image_size}x{image_size}"
    )

    t0 = time.perf_counter()
    if trainer.dssl is not None and cfg.train.dssl_prefill:
        trainer._prefill()  # as Trainer.fit does before step 1
    _sync(device)
    prefill_s = time.perf_counter() - t0
    trainer.training_module.train()
    stream = trainer._stream()
    params = [p for p in trainer.training_module.parameters() if p.requires_grad]
    window = torch.zeros(8, dtype=torch.float64)
    steps: list[dict[str, Any]] = []

    def one_step() -> dict[str, Any]:
        window.zero_()
        _sync(device)
        t = time.perf_counter()
        lr = trainer._optimizer_step(stream, params, window)
        _sync(device)
        seconds = time.perf_counter() - t
        n = float(window[3]) or 1.0
        return {
            "step": trainer.step,
            "s": seconds,
            "lr": lr,
            "loss": float(window[0]) / n,
            "loss_txt": float(window[1]) / n,
            "loss_pbsd": float(window[2]) / n,
        }

    for _ in range(args.train_warmup):
        steps.append({**one_step(), "timed": False})
        _say(
            f"[train] warm-up step {steps[-1]['step']}: {steps[-1]['s']:.3f} s, loss {steps[-1]['loss']:.4f}"
        )
    resident = _allocated(device)
    _reset_peak(device)
    for _ in range(args.train_steps):
        steps.append({**one_step(), "timed": True})
        _say(
            f"[train] step {steps[-1]['step']}: {steps[-1]['s']:.3f} s, loss {steps[-1]['loss']:.4f} "
            f"(txt {steps[-1]['loss_txt']:.4f}, pbsd {steps[-1]['loss_pbsd']:.4f})"
        )
    step_peak = _peak(device)
    times = [s["s"] for s in steps if s["timed"]]
    fits = fits_card(step_peak)
    _say(
        f"[train] step time: median {statistics.median(times):.3f} s over {len(times)} steps "
        f"({cfg.train.batch_size} samples/step); peak during the steps {_fmt_peak(step_peak)}"
        + (f"; fits a {CARD_GIB:.0f} GB card: {fits}" if fits is not None else "")
    )
    result = {
        "engine": engine,
        "wrapper": wrapper,
        "how": "vmad.train.trainer.Trainer; its build_vmad(cfg.model) replaced by the random-weights build "
        "of (a) while it is constructed (the Trainer has no random-weights option); steps by "
        "Trainer._optimizer_step after Trainer._prefill, as fit() runs them, without checkpoints",
        "config": os.path.relpath(Path(args.config).resolve(), REPO),
        "overrides": {k: str(v).replace(str(tmp), "<tmp>") for k, v in overrides.items()}
        | {"extra": list(args.set)},
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "lora_r": cfg.model.lora.r,
        "dssl": {
            "num_boxes": cfg.dssl.num_boxes,
            "box_size": cfg.dssl.box_size,
            "patch_tokens": cfg.dssl.patch_tokens,
            "prefill": cfg.train.dssl_prefill,
        },
        "images": len(trainer.dataset),
        "image_size": image_size,
        "trained_parameters": trained,
        "dtypes": dtypes,
        "setup_s": setup_s,
        "setup_peak": setup_peak,
        "prefill_s": prefill_s,
        "resident_gib": resident,
        "steps": steps,
        "step": summary_of(times),
        "peak": step_peak,
        "fits_24gb": fits,
        "all_losses_finite": all(np.isfinite(s["loss"]) for s in steps),
    }
    return result


# ----------------------------------------------------------------------------------------------- (c) report
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": machine_description(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "deepspeed": _version("deepspeed"),
        "peft": _version("peft"),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / GIB,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            driver=_nvidia_driver(),
        )
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt_dtypes(dtypes: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in dtypes.items())


def render(fig: dict[str, Any]) -> str:
    m, a, t = fig["machine"], fig.get("inference"), fig.get("training")
    cuda = fig["device"].startswith("cuda")
    low = fig["llm_dtype"] != "float32"  # the LLM (and the encoders cast here) in bf16
    gpu = (
        f"{m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, compute capability {m['compute_capability']}, "
        f"{m['gpu_count']} visible, driver {m['driver'] or 'unknown'}); host: "
        if "gpu" in m
        else "no GPU; "
    )
    title = "# Paper preset on one GPU with random bf16 weights: inference and a ZeRO-2 training step"
    if not (fig["preset"] == "paper" and cuda):
        title += f" (smoke run: {fig['preset']} preset on {fig['device']})"
    lines = [
        title,
        "",
        f"- date: {fig['date']}",
        f"- machine: {gpu}{m['host']}",
        f"- software: torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}), transformers "
        f"{m['transformers']}, accelerate {m['accelerate']}, deepspeed {m['deepspeed']}, peft {m['peft']}",
        f"- command: `{fig['command']}`",
        f"- model: `{fig['preset']}` preset, `build_vmad(..., random_weights=True, on_meta=False)` with the "
        "parameters created on the device"
        + (
            f"; the LLM in `llm.dtype` ({fig['llm_dtype']}) and, as `from_pretrained(dtype=...)` loads them "
            "from the local folders, the CLIP vision tower and the SAM image encoder cast to it"
            if low
            else ""
        ),
        "",
    ]
    if a is not None:
        s, g = a["segment"], a["generate"]
        resident = a["resident_gib"]
        lines += [
            "## (a) Inference, batch 1",
            "",
            f"- {a['total_parameters']:,} parameters ({a['trainable_parameters']:,} trained by VMAD), "
            f"{a['visual_tokens']} visual tokens; built in {a['build_s']:.1f} s"
            + (f"; {resident:.2f} GiB allocated after the build" if resident is not None else ""),
            f"- parameter dtypes: {_fmt_dtypes(a['dtypes'])}",
            f"- one seeded random {a['image_size']}x{a['image_size']} image; question: "
            f'"{a["question"]}"; {fig["args"]["warmup"]} warm-up run(s), then {fig["args"]["repeats"]} '
            "timed runs"
            + (" (`torch.cuda.synchronize` before and after each)" if cuda else "")
            + f"; `generate` decodes exactly {g['tokens']} tokens (end-of-answer ids suppressed) with the "
            "KV cache; peak memory includes the weights",
            "",
            "| pass | median (s) | min (s) | max (s) | tokens/s | peak memory |",
            "|---|---:|---:|---:|---:|---|",
            f"| `segment` (one forward, mask at the input size) | {s['median_s']:.4f} | {s['min_s']:.4f} | "
            f"{s['max_s']:.4f} | | {_fmt_peak(s['peak'])} |",
            f"| `generate`, {g['tokens']} tokens (prefill + decode) | {g['median_s']:.4f} | "
            f"{g['min_s']:.4f} | {g['max_s']:.4f} | {g['tokens_per_s']:.1f} | {_fmt_peak(g['peak'])} |",
            "",
        ]
    if t is not None:
        st = t["step"]
        overrides = ", ".join(f"`{k}={v}`" for k, v in t["overrides"].items() if k != "extra")
        extra = f", extra {t['overrides']['extra']}" if t["overrides"]["extra"] else ""
        setup_note = " (includes the float32 LLM created before the bf16 cast)" if low and cuda else ""
        lines += [
            f"## (b) One training step: LoRA + DSSL, {t['engine']}",
            "",
            f"- {t['how']}; `accelerator.prepare` returned a `{t['wrapper']}`",
            f"- config `{t['config']}` with {overrides}{extra}",
            f"- batch {t['batch_size']} per process (paper: 2 per GPU, 8 GPUs), grad_accum "
            f"{t['grad_accum']}, one process; LoRA r={t['lora_r']}; DSSL {t['dssl']['num_boxes']} boxes of "
            f"{t['dssl']['box_size']} px, patch tokens `{t['dssl']['patch_tokens']}`, memory prefill "
            f"{t['dssl']['prefill']} ({t['prefill_s']:.1f} s); {t['trained_parameters']:,} trained "
            "parameters",
            f"- parameter dtypes after `accelerator.prepare`: {_fmt_dtypes(t['dtypes'])}",
            f"- data: {t['images']} synthetic RIAD images {t['image_size']}x{t['image_size']} (half with a "
            "square defect) in a temporary folder",
            "- Trainer construction (model build, DSSL, AdamW, `accelerator.prepare`): "
            f"{t['setup_s']:.1f} s, peak {_fmt_peak(t['setup_peak'])}{setup_note}",
            "",
            "| step | timed | time (s) | loss | L_txt | L_pbsd |",
            "|---:|---|---:|---:|---:|---:|",
            *(
                f"| {s['step']} | {'yes' if s['timed'] else 'warm-up'} | {s['s']:.3f} | {s['loss']:.4f} | "
                f"{s['loss_txt']:.4f} | {s['loss_pbsd']:.4f} |"
                for s in t["steps"]
            ),
            "",
            f"- step time: median **{st['median_s']:.3f} s** (min {st['min_s']:.3f}, max {st['max_s']:.3f}) "
            f"over {len(st['times_s'])} timed steps; losses finite: {t['all_losses_finite']}",
            f"- peak memory over the timed steps: **{_fmt_peak(t['peak'])}**"
            + (
                f" ({t['resident_gib']:.2f} GiB allocated before them)"
                if t["resident_gib"] is not None
                else ""
            ),
        ]
        if t["fits_24gb"] is not None:
            lines.append(
                f"- fits a {CARD_GIB:.0f} GB card (the paper's; {CARD_GIB:.0f} GiB less ~{CONTEXT_GIB} GiB "
                f"of CUDA context, judged by reserved memory): **{t['fits_24gb']}**"
            )
        lines.append("")
    for phase in ("inference", "training"):
        if f"{phase}_error" in fig:
            lines += [f"## {phase}: FAILED", "", f"`{fig[phase + '_error']}`", ""]
    lines += [
        "Notes: random weights, so the answers and masks are meaningless; time and memory do not depend on "
        "the weights' values. With one process ZeRO-2 shards nothing; on the paper's 8 GPUs the optimizer "
        "states and gradients of the trained parameters are split 8 ways, while the frozen weights (the bulk "
        "of the memory) are replicated on every GPU.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        default="paper",
        choices=("paper", "small", "tiny"),
        help="model preset (default paper; tiny with --device cpu is the smoke test)",
    )
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--config", type=Path, help="training YAML (default configs/<preset>.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument(
        "--deepspeed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DeepSpeed ZeRO-2 for the training step (default: on with cuda, off on the CPU)",
    )
    ap.add_argument("--mixed-precision", default="bf16", choices=("bf16", "no"), help="Accelerate (bf16)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generate decodes (32)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed inference runs before the timed ones (2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed inference runs (5)")
    ap.add_argument("--batch-size", type=int, default=2, help="training batch per process (paper: 2)")
    ap.add_argument("--train-images", type=int, default=8, help="synthetic RIAD images (8)")
    ap.add_argument("--train-warmup", type=int, default=1, help="untimed training steps (1)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (3)")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument(
        "--out",
        type=Path,
        help="Markdown record (default for the paper preset on cuda: "
        "benchmarks/results/paper_preset_gpu.md; never under benchmarks/results otherwise)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON (- = stdout)")
    args = ap.parse_args(argv)
    for name in ("tokens", "repeats", "batch_size", "train_images", "train_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.train_warmup < 0:
        ap.error("--warmup and --train-warmup must be >= 0")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"error: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); this "
            "benchmark needs one (CPU smoke test: --preset tiny --device cpu)",
            file=sys.stderr,
        )
        return 2
    if device.type not in ("cuda", "cpu"):
        ap.error("--device must be cuda[:N] or cpu")
    real = args.preset == "paper" and device.type == "cuda"
    if args.out is None and real:
        args.out = DEFAULT_OUT
    if args.out is not None and not real and args.out.resolve().is_relative_to(RESULTS.resolve()):
        print(
            f"error: a {args.preset} run on {device} must not write under benchmarks/results (use /tmp)",
            file=sys.stderr,
        )
        return 2
    if args.deepspeed is None:
        args.deepspeed = device.type == "cuda" and not args.skip_train
    if args.deepspeed and not args.skip_train:
        if importlib.util.find_spec("deepspeed") is None:
            print(
                "error: deepspeed is not installed (pip install -e '.[deepspeed]', or pass --no-deepspeed)",
                file=sys.stderr,
            )
            return 2
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # one process without a launcher, as tests/train/deepspeed_run.py (a launcher's values win)
        local = str(device.index or 0) if device.type == "cuda" else "0"
        defaults = {"RANK": "0", "LOCAL_RANK": local, "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = _free_port()
    if args.config is None:
        args.config = REPO / "configs" / f"{args.preset}.yaml"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    from vmad.errors import VMADError
    from vmad.train.config import load_train_config

    try:
        cfg = load_train_config(args.config, ["data.root=unused", *args.set]).model
    except VMADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.preset != args.preset:
        ap.error(f"{args.config} describes the {cfg.preset!r} preset, not {args.preset!r}")
    image_size = max(cfg.vision.image_size, cfg.backbone.image_size)
    command = "python benchmarks/paper_preset_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    fig: dict[str, Any] = {
        "preset": args.preset,
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "machine": machine_info(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "llm_dtype": cfg.llm.dtype,
    }
    m = fig["machine"]
    _say(
        f"{args.preset} preset on {device}: "
        + (f"{m['gpu']}, {m['gpu_memory_gib']:.0f} GiB; " if "gpu" in m else "")
        + f"torch {m['torch']} (CUDA {m['cuda']}); {m['host']}"
    )
    failed = False
    if not args.skip_inference:
        try:
            fig["inference"] = run_inference(args, cfg, device, image_size)
        except Exception as exc:  # keep going: the training figures are independent (and device time dear)
            failed = True
            fig["inference_error"] = _failure("inference", exc)
        _free(device)  # the inference model is gone with run_inference's frame
    if not args.skip_train:
        try:
            with tempfile.TemporaryDirectory(prefix="vmad_paper_gpu_") as tmp:
                fig["training"] = run_training(args, device, image_size, Path(tmp))
        except Exception as exc:
            failed = True
            fig["training_error"] = _failure("training", exc)
    text = render(fig)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        _say(f"wrote {args.out}")
    if args.json:
        payload = json.dumps(fig, indent=1, default=str)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n", encoding="utf-8")
            _say(f"wrote {args.json}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
