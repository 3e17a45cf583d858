"""Parameter counts per component of a VMAD model (``vmad model summary``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def count_parameters(module: nn.Module | None, seen: set[int] | None = None) -> tuple[int, int]:
    """(parameters, trainable) of ``module``, each parameter counted once (tied weights, shared modules)."""
    if module is None:
        return 0, 0
    total = trainable = 0
    for p in module.parameters():
        if seen is not None:
            if id(p) in seen:
                continue
            seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts per component of a :class:`~vmad.model.vmad.VMADModel` (each parameter counted once
    overall), the projector kind and the visual-token count."""
    seen: set[int] = set()
    components: dict[str, dict[str, Any]] = {}
    parts = [
        ("vision_encoder", model.vision_encoder),
        ("projector", model.projector),
        ("llm", nn.ModuleList([model.llm, model.new_token_rows])),
        ("seg_head", model.seg_head),
        ("visual_backbone", model.visual_backbone),
        ("mask_decoder", nn.ModuleList([m for m in (model.neck, model.mask_decoder) if m is not None])),
    ]
    if model.mask_prompt is not None:
        parts.append(("mask_prompt", model.mask_prompt))
    if model.seg_verdict is not None:
        parts.append(("seg_verdict", model.seg_verdict))
    if model.mask_refiner is not None:
        parts.append(("mask_refiner", model.mask_refiner))
    for name, module in parts:
        total, trainable = count_parameters(module)
        count_parameters(module, seen)
        components[name] = {"parameters": total, "trainable": trainable}
    components["projector"]["kind"] = model.config.projector.kind
    if model.visual_backbone is None:
        components["visual_backbone"] = {
            **components["vision_encoder"],
            "trainable": 0,
            "shared_with": "vision_encoder",
        }
    total, trainable = count_parameters(model)
    grid = model.vision_encoder.grid
    rows = model.new_token_rows
    return {
        "preset": model.config.preset,
        "visual_tokens": int(model.projector.num_output_tokens(grid)),
        "encoder_tokens": grid * grid,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "components": components,
        "new_tokens": dict(zip(model.new_tokens, rows.token_ids, strict=True)),
        "seg_token_id": model.seg_token_id,
        "image_token_id": model.image_token_id,
    }
