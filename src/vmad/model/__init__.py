"""VMAD model: vision encoders, projectors (LTC), LLM with LoRA and ``<seg>``, Γ, mask decoder, presets.

Names are imported lazily so that ``import vmad.model.efficientnet`` does not pull in transformers/peft."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PRESETS": "vmad.model.build",
    "build_vmad": "vmad.model.build",
    "preset_config": "vmad.model.build",
    "VMADConfig": "vmad.model.config",
    "VMADModel": "vmad.model.vmad",
    "load_pretrained": "vmad.model.build",
    "VMADOutput": "vmad.model.outputs",
    "GenerationResult": "vmad.model.outputs",
    "SegmentationResult": "vmad.model.outputs",
    "image_scores": "vmad.model.scoring",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vmad.model' has no attribute {name!r}")
