"""Pre-flight checks of a built model (``vmad model check``): what a researcher runs before a long training
job. Architecture, vocabulary and added-token ids, where Ψ started from, and one image through
:meth:`VMADModel.segment` and a short :meth:`VMADModel.generate`, timed, with peak memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vmad.model.vmad import VMADModel


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory (MiB)."""
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    if device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def check_structure(model: VMADModel, report: CheckReport) -> None:
    """Vocabulary rows, the added tokens, Ψ's token count and origin, the parts VMAD trains."""
    embedding_rows = model.base_lm().get_input_embeddings().weight.shape[0]
    vocab = len(model.tokenizer)
    report.add(
        "vocabulary", vocab <= embedding_rows, f"tokenizer {vocab} ids, embedding {embedding_rows} rows"
    )
    for token, token_id in (("<seg>", model.seg_token_id), ("<image>", model.image_token_id)):
        round_trip = model.tokenizer.convert_ids_to_tokens(token_id)
        trained = "trained row" if token_id in model.new_token_rows.token_ids else "base row"
        ok = 0 <= token_id < embedding_rows and round_trip == token
        report.add(f"{token} id", ok, f"id {token_id} -> {round_trip!r} ({trained})")
    report.add("distinct ids", model.seg_token_id != model.image_token_id, "<seg> and <image> differ")
    info = model.summary()
    grid = model.vision_encoder.grid
    report.add(
        "projector",
        info["visual_tokens"] > 0,
        f"{model.config.projector.kind}: {grid * grid} encoder tokens -> {info['visual_tokens']} visual "
        f"tokens; initialised from {getattr(model, 'projector_init', 'random')}",
    )
    frozen = [n for n in ("vision_encoder", "visual_backbone") if info["components"][n]["trainable"]]
    report.add(
        "frozen encoders", not frozen, "trainable parameters in " + ", ".join(frozen) if frozen else "ok"
    )
    report.add(
        "trainable parameters",
        info["trainable_parameters"] > 0,
        f"{info['trainable_parameters']:,} of {info['total_parameters']:,}",
    )


@torch.no_grad()
def check_passes(
    model: VMADModel, report: CheckReport, image: torch.Tensor, question: str, tokens: int
) -> None:
    """One image through ``segment`` and a ``tokens``-token ``generate``: shapes, finite values, time."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    seg = model.segment(image, question)
    report.timings["segment_s"] = time.perf_counter() - start
    ok = tuple(seg.probs.shape[-2:]) == tuple(image.shape[-2:]) and bool(torch.isfinite(seg.scores).all())
    report.add("segment", ok, f"mask {tuple(seg.probs.shape)}, score {float(seg.scores[0]):.4f}")
    start = time.perf_counter()
    gen = model.generate(image, question, max_new_tokens=tokens)
    report.timings["generate_s"] = time.perf_counter() - start
    report.add(
        "generate", len(gen.token_ids[0]) > 0, f"{len(gen.token_ids[0])} tokens: {gen.texts[0][:80]!r}"
    )
    report.peak_memory_mb = _peak_memory_mb(device)


def check_model(
    model: VMADModel, image: torch.Tensor | None = None, question: str | None = None, tokens: int = 16
) -> CheckReport:
    """All checks; ``image``: ``[3, H, W]`` in [0, 1] (default: a seeded random 3:2 image)."""
    report = CheckReport()
    check_structure(model, report)
    if image is None:
        image = torch.rand(3, 320, 480, generator=torch.Generator().manual_seed(0))
    question = (
        question or "Are there any abnormalities present in the object? Please output the segmentation."
    )
    check_passes(model, report, image.to(model.device), question, tokens)
    return report


def report_dict(report: CheckReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "checks": [c.__dict__ for c in report.checks],
        "timings_s": report.timings,
        "peak_memory_mb": report.peak_memory_mb,
    }
