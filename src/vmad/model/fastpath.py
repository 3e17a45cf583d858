"""The GPU fast path of inference (``--device cuda``); the CPU path never goes through it.

:func:`enable_fast_path` changes a loaded :class:`~vmad.model.vmad.VMADModel` in place, for inference only:

- bf16 weights for the frozen encoders (F_I, the visual backbone) and the LLM; the trained small parts (Ψ,
  Γ, neck, mask decoder, mask prompt, the new token rows) stay float32 (TF32 matmuls allowed);
- LoRA merged into the LLM's weights (no adapter matmuls per step; merged in place, so the model is then
  for inference only);
- SDPA attention in every Hugging Face part that supports it (LLM, CLIP, SAM's image encoder);
- the images' resize rules run as batched tensor ops on the GPU (``FrozenImageModule.resize_on_device``);
- greedy decoding with a ``StaticCache`` and the one-token step compiled by ``torch.compile``
  (``reduce-overhead``: CUDA graphs) (:class:`vmad.model.generation.DecodeOptions`).

Each frozen encoder already runs once per image and batch (``EncodedImages.embeddings``); segment and
generate take whole batches (:mod:`vmad.model.generation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vmad.errors import VMADError
from vmad.model.image_encoders import FrozenImageModule
from vmad.model.vmad import VMADModel


def _hf_parts(model: VMADModel) -> dict[str, nn.Module]:
    """The Hugging Face models inside ``model`` (anything with a ``config._attn_implementation``)."""
    parts: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation") and not any(name.startswith(p + ".") for p in parts):
            parts[name or "model"] = module
    return parts


def attention_implementations(model: VMADModel) -> dict[str, str]:
    """``{part: attention implementation}`` of the Hugging Face parts (SAM's image encoder: the class its
    layers use, ``sdpa`` or ``eager``)."""
    out = {name: str(m.config._attn_implementation) for name, m in _hf_parts(model).items()}
    for name, module in model.named_modules():
        if type(module).__name__ == "SamVisionSdpaAttention":
            out.setdefault(name.split(".layers.")[0], "sdpa")
        elif type(module).__name__ == "SamVisionAttention":
            out[name.split(".layers.")[0]] = "eager"
    return out


def _use_sdpa(model: VMADModel) -> None:
    for module in _hf_parts(model).values():
        setter = getattr(module, "set_attn_implementation", None)
        if callable(setter) and module.config._attn_implementation != "sdpa":
            try:
                setter("sdpa")
            except (ValueError, ImportError):  # a part without SDPA keeps its own attention
                pass


def _merge_lora(model: VMADModel) -> bool:
    merge = getattr(model.llm, "merge_adapter", None)
    if not callable(merge):
        return False
    merge()
    return True


def enable_fast_path(
    model: VMADModel,
    dtype: torch.dtype = torch.bfloat16,
    compile_decode: bool | None = None,
    static_cache: bool = True,
) -> dict[str, Any]:
    """Turn ``model`` (eval mode, already on its device) into the fast inference model described in the
    module docstring; returns what was done. ``compile_decode`` None = on CUDA only (``torch.compile`` of
    the decode step needs a GPU to pay off). Refuses a model in training mode."""
    if model.training:
        raise VMADError("the fast path is for inference: call model.eval() first")
    device = model.device
    for part in (model.vision_encoder, model.visual_backbone, model.llm):
        if part is not None:
            part.to(dtype)
    merged = _merge_lora(model)
    _use_sdpa(model)
    for module in model.modules():
        if isinstance(module, FrozenImageModule):
            module.resize_on_device = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    options = model.decode_options
    options.static_cache = static_cache
    wanted = device.type == "cuda" if compile_decode is None else compile_decode
    options.compile = bool(static_cache and wanted)
    options.compiled.clear()
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "lora_merged": merged,
        "attention": attention_implementations(model),
        "resize_on_device": True,
        "static_cache": options.static_cache,
        "compiled_decode": options.compile,
    }
