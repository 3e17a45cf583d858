"""Reading and writing what VMAD trains: ``model.safetensors`` (the trained parts only) + ``config.json``.

The base weights (vision encoder, LLM, frozen backbone) are never written:
:func:`vmad.model.build.load_pretrained` rebuilds them from the saved config and loads the trained parts on
top. Format version 2 names the added token rows ``new_token_rows.*``; version 1 files (``new_token_embed`` /
``new_token_out``, and training-only ``aux_modules.*`` DSSL heads) are read too.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vmad.atomic import write_json_atomic
from vmad.errors import VMADError
from vmad.tensor_io import save_safetensors

TRAINABLE_FORMAT = "vmad-trainable"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PACKAGED_MODELS: dict[str, str] = {"small": "weights/small"}
# Top-level parts whose whole state (buffers included) is trained and saved.
TRAINED_PARTS = (
    "projector.", "seg_head.", "mask_decoder.", "neck.", "new_token_rows.", "mask_prompt.", "seg_verdict.",
    "mask_refiner.",
)
# Version-1 key names -> current ones.
LEGACY_KEYS = {"new_token_embed": "new_token_rows.embed", "new_token_out": "new_token_rows.out"}
LEGACY_SCALARS = ("mask_decoder.logit_bias",)  # [1] since version 2
LEGACY_AUX_PREFIX = "aux_modules."  # version 1 saved DSSL's training heads inside the model file


def packaged_weights_dir(name: str = "small") -> Path:
    """Where the packaged weights of ``name`` live inside the installed package (may not exist)."""
    return Path(str(importlib.resources.files("vmad").joinpath(PACKAGED_MODELS[name])))


# A `vmad train` output folder: OUTPUT_DIR/final/ (the finished run) and OUTPUT_DIR/checkpoint-<step>/model/.
TRAIN_FINAL_DIR = "final"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MODEL_DIR = "model"


def _is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def checkpoint_model_folders(folder: Path) -> list[Path]:
    """``checkpoint-<step>/model`` folders holding weights under a training output folder, by step."""
    found = []
    for child in folder.iterdir():
        step = child.name[len(CHECKPOINT_PREFIX):]
        if child.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and _is_model_folder(
            child / CHECKPOINT_MODEL_DIR
        ):
            found.append((int(step), child / CHECKPOINT_MODEL_DIR))
    return [path for _, path in sorted(found)]


def _training_folder(folder: Path) -> Path:
    """The weights of a ``vmad train`` output folder: its ``final/``; VMADError naming the checkpoints when
    the run has not finished (or saying it is no model folder at all)."""
    if _is_model_folder(folder / TRAIN_FINAL_DIR):
        return folder / TRAIN_FINAL_DIR
    checkpoints = checkpoint_model_folders(folder)
    if checkpoints:
        listed = ", ".join(str(p) for p in checkpoints[-5:])
        raise VMADError(
            f"{folder}: a training output folder without final/ (the run has not finished; `vmad train ... "
            f"--resume` continues it); pass one of its checkpoints' weights: {listed}"
        )
    if (folder / TRAIN_FINAL_DIR).is_dir() or (folder / "log.jsonl").is_file():
        raise VMADError(f"{folder}: a training output folder with no weights yet (no final/, no checkpoint)")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    raise VMADError(f"{folder}: not a VMAD checkpoint folder (missing {', '.join(missing)})")


def resolve_model_path(model: str | Path) -> Path:
    """``"small"`` -> the packaged weights folder; anything else is a folder written by
    :func:`save_trainable` (training's ``final/``, a checkpoint's ``model/``; a folder literally named
    ``small`` is ``./small``) or a ``vmad train`` output folder, which gives its ``final/`` (VMADError
    listing its checkpoints when there is none). A clear VMADError when the files are missing."""
    if isinstance(model, str) and model in PACKAGED_MODELS:
        folder = packaged_weights_dir(model)
        if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
            raise VMADError(
                f"the packaged {model!r} weights are not installed ({folder} has no {CONFIG_NAME} + "
                f"{WEIGHTS_NAME}); pass a trained checkpoint folder instead (--model PATH)"
            )
        return folder
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise VMADError(f"{folder}: no such model folder (expected 'small' or a checkpoint folder)")
    if _is_model_folder(folder):
        return folder
    return _training_folder(folder)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved model folder (checked to be a VMAD trainable-weights file)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise VMADError(f"{folder}: no {CONFIG_NAME} (not a VMAD checkpoint folder)")
    path = folder / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VMADError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise VMADError(
            f"{path}: not a {TRAINABLE_FORMAT} file (a JSON {type(meta).__name__}, not a mapping)"
        )
    if meta.get("format") != TRAINABLE_FORMAT:
        raise VMADError(f"{path}: not a {TRAINABLE_FORMAT} file (format {meta.get('format')!r})")
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise VMADError(f"{path}: 'version' must be an integer, got {version!r}")
    if not isinstance(meta.get("config"), dict):
        raise VMADError(f"{path}: no 'config' mapping")
    if version > FORMAT_VERSION:
        raise VMADError(
            f"{folder}: written by a newer vmad (format version {meta['version']}, this one reads up to "
            f"{FORMAT_VERSION})"
        )
    return meta


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what VMAD trains: LoRA weights, projector, Γ, neck, decoder, new token rows, mask prompt."""
    trained_llm = {f"llm.{n}" for n, p in model.llm.named_parameters() if p.requires_grad or "lora_" in n}
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PARTS) or k in trained_llm}


def save_trainable(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.safetensors`` (trained parts) and ``config.json`` to folder ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_NAME, trainable_state_dict(model), metadata={"format": "pt"})
    meta = {
        "format": TRAINABLE_FORMAT,
        "version": FORMAT_VERSION,
        "new_tokens": model.new_tokens,
        "new_token_ids": model.new_token_rows.token_ids,
        "config": model.config.to_dict(),
    }
    write_json_atomic(folder / CONFIG_NAME, meta, indent=2)
    return folder


def read_weights_file(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file; a VMADError naming it when it is missing, truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VMADError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VMADError(f"{path}: not a readable safetensors file ({exc})") from None


def read_trainable(folder: str | Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(model tensors under current names, legacy training-only aux tensors)`` of a saved folder."""
    state = read_weights_file(Path(folder) / WEIGHTS_NAME, device)
    aux = {k: v for k, v in state.items() if k.startswith(LEGACY_AUX_PREFIX)}
    model_state = {LEGACY_KEYS.get(k, k): v for k, v in state.items() if k not in aux}
    for key in LEGACY_SCALARS:  # version 1 stored these as 0-dim tensors
        if key in model_state and model_state[key].dim() == 0:
            model_state[key] = model_state[key].reshape(1)
    return model_state, aux


def load_trainable(
    model: nn.Module, path: str | Path, keep_fresh: Sequence[str] = (), leave_out: Sequence[str] = ()
) -> list[str]:
    """Load :func:`save_trainable`'s weights onto a freshly built ``model``; every trained key must match,
    except keys under a ``keep_fresh`` prefix (e.g. ``"mask_prompt."`` when fine-tuning a model without
    one), which may be absent and keep their initial values, and checkpoint keys under a ``leave_out`` prefix
    (an optional part the model is built without, e.g. the packaged model's prior prompt), which are not
    loaded. Returns the absent keys."""
    folder = Path(path)
    meta = read_meta(folder)
    if meta.get("new_token_ids") != model.new_token_rows.token_ids:
        raise VMADError(
            f"{folder}: added token ids {meta.get('new_token_ids')} differ from this base model's "
            f"{model.new_token_rows.token_ids}"
        )
    state, _ = read_trainable(folder, device=str(model.device))
    own = trainable_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    for key in [k for k in unexpected if leave_out and k.startswith(tuple(leave_out))]:
        unexpected.remove(key)
        del state[key]
    fresh = [k for k in missing if keep_fresh and k.startswith(tuple(keep_fresh))]
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise VMADError(
            f"{folder}: checkpoint does not match the model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise VMADError(f"{folder}: checkpoint shapes differ from the model's ({'; '.join(wrong[:3])})")
    model.load_state_dict(state, strict=False)
    return fresh


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and write the trained token rows into the base embedding/head
    (outputs unchanged); returns the plain causal LM, ready for ``save_pretrained``."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    base = model.base_lm()
    model.new_token_rows.write_into(base)
    return base
