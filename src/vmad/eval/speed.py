"""``vmad bench``: inference speed of a VMAD model and, in the same run on the same device, of the stock
pipeline a user would otherwise chain: transformers' ``LlavaForConditionalGeneration`` (answer) and
``SamModel`` (mask), with random weights built from configs (nothing downloaded).

What is timed (images are random tensors already on the device; reading files is not timed):

- segmentation only, batch 1: VMAD ``segment`` (F_I, Ψ, one LLM forward over the question and "It is
  <seg>.", backbone, decoder, mask at the image size); stock: LLaVA's prefill over the same number of text
  tokens plus its image tokens (its CLIP tower and projector included), then SAM's image encoder and mask
  decoder prompted with one point, the mask upsampled to the image size. Inputs are resized and normalised
  on the device in both. ``warmup`` untimed runs, then ``repeats`` timed ones: median and p90 in ms;
  ``images_per_s_batch1`` = 1000 / median;
- the same at each batch size of ``batches`` (``batch_repeats`` timed runs): images/s = batch / median
  time; ``best_batch`` is the fastest (``images_per_s_by_batch`` lists them all);
- decoding, batch 1, greedy, stop tokens ignored: (tokens - 1) / (time of ``tokens`` tokens - time of 1
  token), each the fastest of 3 runs, so the prefill cancels out (None when the difference is not positive:
  too few tokens for the timing noise) (VMAD ``generate``; stock ``LlavaForConditionalGeneration.generate``
  with ``min_new_tokens``). A VMAD answer that emits ``<seg>`` includes its mask work
  (``decode_includes_seg``);
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per pipeline); on the CPU the process's
  peak resident set (Linux ``VmHWM``, reset per pipeline through ``/proc/self/clear_refs``), which includes
  the weights. The VMAD model is freed before the stock one is built.

Stock shapes (:func:`stock_shapes`): the LLM is always the VMAD model's own LLM shape (Llama family). The
paper preset's CLIP ViT-L/14-336 and SAM ViT-H are used as they are. Where the VMAD model has no CLIP or
SAM (tiny, small presets) the stock pipeline uses scaled-down members of the same families, named in the
output (``stock.shapes``): a CLIP ViT with the tiny encoder's own shape or ViT-Ti/16 for EfficientNet-Lite0
at the same input side and token grid, and a SAM image encoder of that size at the same input side.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vmad import __version__
from vmad.errors import ConfigError
from vmad.model.image_encoders import CLIPVisionEncoder, SamBackbone, TinyVisionEncoder
from vmad.model.vmad import VMADModel

QUESTION = (
    "Are there any abnormalities present in the bottle? If so, please output the defect segmentation result."
)
KEYS = (
    "seg_ms_batch1_median",
    "seg_ms_batch1_p90",
    "images_per_s_batch1",
    "images_per_s_best",
    "best_batch",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "device",
)


@dataclass
class BenchSettings:
    """How :func:`run_bench` measures (see the module docstring). ``image_size`` None = the model's largest
    input side."""

    image_size: int | None = None
    batches: tuple[int, ...] = (1, 2, 4, 8)
    warmup: int = 2
    repeats: int = 10
    batch_repeats: int = 3
    tokens: int = 32
    stock: bool = True

    def validate(self) -> BenchSettings:
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image size must be >= 16, got {self.image_size}")
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.warmup < 0 or self.repeats < 1 or self.batch_repeats < 1:
            raise ConfigError("warmup must be >= 0, repeats and batch repeats >= 1")
        if self.tokens < 2:
            raise ConfigError(f"decode tokens must be >= 2, got {self.tokens}")
        return self


# ------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _hwm_bytes() -> int | None:
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


class PeakMemory:
    """Peak memory of one pipeline: CUDA allocations, or the process's peak resident set on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "process_peak_rss_since_start"

    def read(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _hwm_bytes()


def _images(batch: int, side: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, side, side, generator=generator).to(device)


def measure(
    segment: Callable[[torch.Tensor], Any],
    decode: Callable[[int], Any],
    side: int,
    device: torch.device,
    settings: BenchSettings,
) -> dict[str, Any]:
    """The keys of :data:`KEYS` (and a few more) for one pipeline given as ``segment(images)`` and
    ``decode(n_tokens)`` (batch 1)."""
    memory = PeakMemory(device)
    memory.reset()
    one = _images(1, side, device)
    seg = timed(lambda: segment(one), settings.warmup, settings.repeats, device)
    median = statistics.median(seg)
    by_batch = {1: 1.0 / median}
    for b in sorted(set(settings.batches) - {1}):
        images = _images(b, side, device)
        times = timed(lambda images=images: segment(images), 1, settings.batch_repeats, device)
        by_batch[b] = b / statistics.median(times)
    best = max(by_batch, key=by_batch.__getitem__)
    warm = max(1, settings.warmup)
    t_one = min(timed(lambda: decode(1), warm, 3, device))  # the fastest run: the least disturbed one
    t_all = min(timed(lambda: decode(settings.tokens), warm, 3, device))
    decode_s = t_all - t_one
    return {
        "seg_ms_batch1_median": 1000.0 * median,
        "seg_ms_batch1_p90": 1000.0 * float(np.percentile(seg, 90)),
        "seg_ms_batch1_all": [1000.0 * t for t in seg],
        "images_per_s_batch1": by_batch[1],
        "images_per_s_best": by_batch[best],
        "best_batch": best,
        "images_per_s_by_batch": {str(b): v for b, v in sorted(by_batch.items())},
        "decode_tokens_per_s": (settings.tokens - 1) / decode_s if decode_s > 0 else None,
        "decode_tokens": settings.tokens,
        "peak_memory_bytes": memory.read(),
        "peak_memory_kind": memory.kind,
        "device": str(device),
    }


def model_side(model: VMADModel) -> int:
    """The largest input side of the model's frozen encoders (the test image side by default)."""
    sides = [model.vision_encoder.image_size]
    if model.visual_backbone is not None:
        sides.append(model.visual_backbone.image_size)
    return int(max(sides))


def measure_vmad(model: VMADModel, settings: BenchSettings, side: int) -> dict[str, Any]:
    """:func:`measure` over ``model.segment`` and ``model.generate(..., ignore_stop=True)``."""
    device = model.device
    image = _images(1, side, device)
    seen = {"seg": False}

    def decode(n: int) -> None:
        out = model.generate(image, QUESTION, max_new_tokens=n, ignore_stop=True)
        seen["seg"] = seen["seg"] or model.seg_token_id in out.token_ids[0]

    out = measure(lambda images: model.segment(images, QUESTION), decode, side, device, settings)
    out["decode_includes_seg"] = seen["seg"]
    out["visual_tokens"] = int(model.summary()["visual_tokens"])
    return out


# ------------------------------------------------------------------------------------------ stock


@dataclass
class StockShapes:
    """Configs of the stock LLaVA and SAM (transformers ``to_dict`` forms) and how they relate to VMAD's."""

    text: dict[str, Any]
    vision: dict[str, Any]
    sam_vision: dict[str, Any]
    sam_decoder: dict[str, Any]
    sam_prompt: dict[str, Any]
    text_tokens: int
    description: dict[str, str] = field(default_factory=dict)


def _vision_shape(model: VMADModel) -> tuple[dict[str, Any], str]:
    enc = model.vision_encoder
    if isinstance(enc, CLIPVisionEncoder):
        return enc.clip.config.to_dict(), "the VMAD model's own CLIP vision tower shape"
    side = enc.image_size
    if isinstance(enc, TinyVisionEncoder):
        cfg = model.config.vision
        shape = dict(hidden_size=cfg.width, intermediate_size=2 * cfg.width, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, patch_size=cfg.patch)  # fmt: skip
        note = (f"CLIP ViT with the tiny encoder's shape ({cfg.width} wide, {cfg.layers} layers, "
                f"patch {cfg.patch})")  # fmt: skip
    else:  # a CNN encoder (EfficientNet-Lite0): ViT-Ti/16, the same input side and token grid
        patch = max(1, side // enc.grid)
        shape = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3,
                     patch_size=patch)  # fmt: skip
        note = f"scaled-down: CLIP ViT-Ti/{patch} at {side} px (for {type(enc).__name__}, same token grid)"
    return {**shape, "image_size": side, "projection_dim": shape["hidden_size"]}, note


def _sam_shape(model: VMADModel) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    from transformers import SamMaskDecoderConfig

    if isinstance(model.visual_backbone, SamBackbone):
        vision = model.visual_backbone.encoder.config.to_dict()
        return vision, SamMaskDecoderConfig().to_dict(), {}, "the VMAD model's own SAM image encoder shape"
    side = model_side(model)
    d = model.config.mask_decoder
    tiny = model.config.vision.kind == "tiny"
    patch = 8 if tiny else 16
    width, layers, heads = (32, 2, 2) if tiny else (192, 12, 3)
    vision = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, image_size=side,
                  patch_size=patch, output_channels=d.dim, window_size=4 if tiny else 8,
                  global_attn_indexes=[layers - 1] if tiny else [2, 5, 8, 11], num_pos_feats=d.dim // 2,
                  mlp_dim=4 * width)  # fmt: skip
    decoder = {"hidden_size": d.dim, "mlp_dim": d.mlp_dim, "num_hidden_layers": d.layers,
               "num_attention_heads": d.heads, "iou_head_hidden_dim": d.dim}  # fmt: skip
    prompt = {"hidden_size": d.dim, "image_size": side, "image_embedding_size": side // patch,
              "mask_input_channels": 16}  # fmt: skip
    note = (f"scaled-down: SAM image encoder {width} wide, {layers} layers, patch {patch} at {side} px; "
            f"SAM mask decoder at the VMAD decoder's shape ({d.dim} wide, {d.layers} layers)")  # fmt: skip
    return vision, decoder, prompt, note


def stock_shapes(model: VMADModel) -> StockShapes:
    """The stock pipeline's shapes for ``model`` (see the module docstring)."""
    from vmad.model.chat_format import tokenize_dialogues

    text = model.base_lm().config.to_dict()
    vision, vision_note = _vision_shape(model)
    sam_vision, sam_decoder, sam_prompt, sam_note = _sam_shape(model)
    enc = tokenize_dialogues(model.tokenizer, model.chat_format, [QUESTION], [model.config.llm.seg_answer])
    text_tokens = int(enc["attention_mask"].sum()) - 1  # the <image> placeholder is not text
    description = {
        "llm": f"the VMAD model's own LLM shape ({text.get('num_hidden_layers')} layers, "
        f"{text.get('hidden_size')} wide)",
        "vision": vision_note,
        "sam": sam_note,
        "text_tokens": f"{text_tokens} text tokens (VMAD's segmentation-only sequence) + the image tokens",
    }
    return StockShapes(text, vision, sam_vision, sam_decoder, sam_prompt, text_tokens, description)


class _DefaultDtype:
    """``torch.set_default_dtype`` for the block (random weights created in the target dtype at once)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.before = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.before)


def _resized(
    images: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``images`` in [0, 1] resized (bilinear, antialiased) and normalised on their device."""
    x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class StockPipeline:
    """Stock transformers LLaVA + SAM at :class:`StockShapes`, random weights, on ``device`` in ``dtype``."""

    def __init__(self, shapes: StockShapes, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, SamConfig, SamModel

        vocab = int(shapes.text["vocab_size"])
        config = LlavaConfig(vision_config=dict(shapes.vision), text_config=dict(shapes.text),
                             image_token_index=vocab - 1)  # fmt: skip
        sam_config = SamConfig(vision_config=shapes.sam_vision, mask_decoder_config=shapes.sam_decoder,
                               prompt_encoder_config=shapes.sam_prompt or None)  # fmt: skip
        with torch.random.fork_rng(devices=[]), torch.device(device), _DefaultDtype(dtype):
            torch.manual_seed(0)
            self.llava: nn.Module = LlavaForConditionalGeneration(config).eval()
            self.sam: nn.Module = SamModel(sam_config).eval()
        self.device, self.dtype = device, dtype
        vision = config.vision_config
        self.clip_side = int(vision.image_size)
        self.image_tokens = (self.clip_side // int(vision.patch_size)) ** 2
        self.sam_side = int(sam_config.vision_config.image_size)
        generator = torch.Generator().manual_seed(0)
        text = torch.randint(3, vocab - 1, (shapes.text_tokens,), generator=generator)
        image = torch.full((self.image_tokens,), vocab - 1)
        self.ids = torch.cat([text[:4], image, text[4:]])[None].to(device)  # prompt head, image, question

    def parameters_count(self) -> int:
        return sum(p.numel() for m in (self.llava, self.sam) for p in m.parameters())

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """LLaVA prefill over the question with the image, then SAM prompted with the centre point; mask
        probabilities at the image size ``[B, H, W]``."""
        from vmad.model.image_encoders import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD

        b = images.shape[0]
        side = self.clip_side
        pixels = _resized(images, (side, side), CLIP_MEAN, CLIP_STD).to(self.dtype)
        ids = self.ids.expand(b, -1)
        self.llava(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        height, width = images.shape[-2:]
        scale = self.sam_side / max(height, width)
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        sam_pixels = _resized(images, size, SAM_MEAN, SAM_STD)
        pad = (0, self.sam_side - size[1], 0, self.sam_side - size[0])
        sam_pixels = F.pad(sam_pixels, pad).to(self.dtype)
        points = torch.tensor([[[[size[1] / 2, size[0] / 2]]]], device=self.device).expand(b, 1, 1, 2)
        out = self.sam(pixel_values=sam_pixels, input_points=points.to(self.dtype), multimask_output=False)
        low = out.pred_masks[:, 0].float()
        return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[:, 0].sigmoid()

    @torch.no_grad()
    def decode(self, image: torch.Tensor, tokens: int) -> torch.Tensor:
        """Greedy ``generate`` of exactly ``tokens`` tokens (default cache), batch 1."""
        from vmad.model.image_encoders import CLIP_MEAN, CLIP_STD

        pixels = _resized(image, (self.clip_side, self.clip_side), CLIP_MEAN, CLIP_STD).to(self.dtype)
        return self.llava.generate(
            input_ids=self.ids, pixel_values=pixels, attention_mask=torch.ones_like(self.ids),
            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip


def measure_stock(shapes: StockShapes, device: torch.device, dtype: torch.dtype, side: int,
                  settings: BenchSettings) -> dict[str, Any]:  # fmt: skip
    """:func:`measure` over :class:`StockPipeline`; also its shapes and parameter count."""
    stock = StockPipeline(shapes, device, dtype)
    image = _images(1, side, device)
    out = measure(stock.segment, lambda n: stock.decode(image, n), side, device, settings)
    out.update(
        pipeline="transformers LlavaForConditionalGeneration (prefill / generate) + SamModel (point prompt), "
        "random weights from configs",
        shapes=shapes.description,
        image_tokens=stock.image_tokens,
        parameters=stock.parameters_count(),
        dtype=str(dtype).removeprefix("torch."),
    )
    return out


# ------------------------------------------------------------------------------------------ the run


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Date, machine, software versions, threads and the load average (a timing is only as good as the
    machine was quiet)."""
    import transformers

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vmad": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "gpu": gpu,
        "threads": torch.get_num_threads(),
        "load_average": load,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(model: VMADModel, label: str, settings: BenchSettings, fast_path: dict | None = None) -> dict:
    """Measure ``model`` then (``settings.stock``) the stock pipeline at :func:`stock_shapes`; the model is
    released (its parameters moved to the meta device) before the stock one is built. Returns the JSON
    object of ``vmad bench --json``."""
    settings.validate()
    device = model.device
    side = settings.image_size or model_side(model)
    env = environment()
    result: dict[str, Any] = {"model": label, "image_size": side, "question": QUESTION, **env}
    result.update(measure_vmad(model, settings, side))
    result["fast_path"] = fast_path
    result["parameters"] = int(sum(p.numel() for p in model.parameters()))
    if settings.stock:
        shapes = stock_shapes(model)
        dtype = next(model.base_lm().parameters()).dtype
        model.decode_options.compiled.clear()  # the compiled step and its static caches
        model.to("meta")
        _free(device)
        stock = measure_stock(shapes, device, dtype, side, settings)
        result["stock"] = stock
        result["ratio"] = {
            "seg_ms_batch1_median": stock["seg_ms_batch1_median"] / result["seg_ms_batch1_median"],
            "images_per_s_best": result["images_per_s_best"] / stock["images_per_s_best"],
            "decode_tokens_per_s": _ratio(result["decode_tokens_per_s"], stock["decode_tokens_per_s"]),
            "meaning": "stock / vmad for times, vmad / stock for rates: > 1 means vmad is faster",
        }
    result["load_average_end"] = environment()["load_average"]
    return result


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """``(measure, vmad, stock)`` text rows of the main figures."""
    stock = result.get("stock") or {}
    rows = []
    for key, label, digits in (
        ("seg_ms_batch1_median", "segmentation only, batch 1, median (ms)", 1),
        ("seg_ms_batch1_p90", "segmentation only, batch 1, p90 (ms)", 1),
        ("images_per_s_batch1", "images/s at batch 1", 2),
        ("images_per_s_best", "images/s at the best batch", 2),
        ("best_batch", "best batch", 0),
        ("decode_tokens_per_s", "decode tokens/s (batch 1)", 1),
    ):
        rows.append((label, _fmt(result.get(key), digits), _fmt(stock.get(key), digits)))
    mib = [r["peak_memory_bytes"] / 2**20 if r.get("peak_memory_bytes") else None for r in (result, stock)]
    rows.append((f"peak memory (MiB, {result.get('peak_memory_kind')})", _fmt(mib[0], 0), _fmt(mib[1], 0)))
    return rows


def markdown_record(result: dict, command: str) -> str:
    """A Markdown record of one run: date, machine, load, command, the figures and the JSON object."""
    import json

    stock = result.get("stock") or {}
    lines = [
        f"## `{command}`",
        "",
        f"- date: {result['date']}; vmad {result['vmad']}, torch {result['torch']}, transformers "
        f"{result['transformers']}, {result['threads']} threads",
        f"- machine: {result['machine']}" + (f", GPU {result['gpu']}" if result.get("gpu") else ", no GPU")
        + f"; load average at start {result['load_average']}, at end {result['load_average_end']}",
        f"- model: {result['model']} on {result['device']}; images {result['image_size']} px square; "
        f"fast path: {result['fast_path'] or 'off'}",
    ]
    if stock:
        lines.append(f"- stock: {stock['pipeline']}; {stock['dtype']}; shapes: {stock['shapes']}")
    lines += ["", "| measure | vmad | stock |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    by_batch = ", ".join(f"{b}: {v:.2f}" for b, v in result["images_per_s_by_batch"].items())
    lines += ["", f"vmad images/s by batch: {by_batch}"]
    if stock:
        stock_batch = ", ".join(f"{b}: {v:.2f}" for b, v in stock["images_per_s_by_batch"].items())
        lines.append(f"stock images/s by batch: {stock_batch}")
    lines += ["", "<details><summary>JSON</summary>", "", "```json", json.dumps(result, indent=1), "```", "",
              "</details>", ""]  # fmt: skip
    return "\n".join(lines)
