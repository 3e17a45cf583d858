"""Training configuration: one YAML file with ``model``, ``data``, ``train``, ``dssl`` and ``output_dir``.

``model`` is :class:`vmad.model.config.VMADConfig` (a section holding ``preset`` starts from that preset and
overrides the keys it lists), ``dssl`` is :class:`vmad.model.dssl.DSSLConfig`. ``--set key=value`` overrides
any key by its dotted path; the value is parsed as YAML and checked against the field's type. An unknown key
anywhere is a :class:`ConfigError` naming it and listing the valid keys at that level.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from vmad.errors import ConfigError
from vmad.model.config import VMADConfig
from vmad.model.dssl import DSSLConfig

SCHEDULERS = ("cosine", "constant")
FREEZABLE = (
    "projector",
    "seg_head",
    "neck",
    "mask_decoder",
    "mask_prompt",
    "new_token_embed",
    "new_token_out",
    "lora",
)


@dataclass
class TaskRatioConfig:
    """Relative frequencies of the paper's three task types (Sec. V-A.2; OURS: the paper gives none)."""

    seg: float = 1.0
    seg_answer: float = 1.0
    vqa: float = 1.0


@dataclass
class DataConfig:
    """Training data.

    Attributes:
        root: dataset folder (RIAD format, or any layout ``vmad data inspect`` reads).
        format: its format (None = detect).
        split: the split to train on (None = every split).
        classes: only these classes (None = all).
        image_size: square side images and masks are resized to (None = the larger of the model's vision
            and backbone input sizes; each module resizes further itself).
        tasks: task-type ratios.
        num_workers: DataLoader worker processes (0 = load in the main process).
    """

    root: str | None = None
    format: str | None = None
    split: str | None = "train"
    classes: list[str] | None = None
    image_size: int | None = None
    tasks: TaskRatioConfig = field(default_factory=TaskRatioConfig)
    num_workers: int = 0


@dataclass
class TrainLoopConfig:
    """Optimisation and bookkeeping.

    Attributes:
        max_steps: optimizer steps (> 0 overrides ``epochs``).
        epochs: passes over the data when ``max_steps`` is 0 (paper: 10).
        batch_size: samples per process and micro-batch (paper: 2 per GPU).
        grad_accum: micro-batches per optimizer step.
        lr, weight_decay, betas, eps: AdamW (paper: lr 1e-6 stated; weight decay and betas OURS).
        scheduler: ``cosine`` (with linear warmup) or ``constant`` (after warmup).
        warmup_steps / warmup_ratio: warmup length in steps (``warmup_steps`` wins when > 0).
        min_lr_ratio: cosine floor as a fraction of ``lr`` (OURS: 0).
        max_grad_norm: gradient clipping (None = off).
        log_every, save_every: log / checkpoint period in optimizer steps (save_every 0: only at the end).
        keep_checkpoints: how many ``checkpoint-<step>`` folders to keep (None = all).
        seed: data order, task draws, DSSL boxes, dropout.
        dssl: add DSSL's L_pbsd (Eq. 17) to the loss.
        dssl_prefill: OURS. Fill the DSSL memory with ``capacity`` samples per class (no gradient, model in
            eval mode) before the first step, so L_pbsd is measured against a full queue from the start.
        progress: show a tqdm progress bar.
        stop_after: DEBUG. Return after this many optimizer steps of this run without the final checkpoint,
            as a killed run would (used by the resume tests).
        init_from: fine-tune: start from these trained weights (``small`` = the packaged VMAD-small, or a
            folder written by ``save_trainable``: a run's ``final/`` or ``checkpoint-<step>/model/``). The
            model section must describe the same model; optimizer, schedule and DSSL (heads, memory) start
            fresh.
        freeze: trained parts kept fixed in this run, by name: ``projector``, ``seg_head``, ``neck``,
            ``mask_decoder``, ``mask_prompt``, ``new_token_embed``, ``new_token_out``, ``lora`` (with
            ``init_from``: e.g. keep the masks of a trained model while its answers are fine-tuned). They are
            still saved with the rest.
    """

    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int | None = None
    seed: int = 0
    dssl: bool = True
    dssl_prefill: bool = True
    progress: bool = True
    stop_after: int | None = None
    init_from: str | None = None
    freeze: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The whole training run (see the module docstring)."""

    model: VMADConfig = field(default_factory=VMADConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    dssl: DSSLConfig = field(default_factory=DSSLConfig)
    output_dir: str = "runs/vmad"

    def validate(self) -> TrainConfig:
        t, d = self.train, self.data
        positive = {
            "train.epochs": t.epochs,
            "train.batch_size": t.batch_size,
            "train.grad_accum": t.grad_accum,
            "train.log_every": t.log_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name, value in {
            "train.max_steps": t.max_steps,
            "train.save_every": t.save_every,
            "train.warmup_steps": t.warmup_steps,
            "data.num_workers": d.num_workers,
        }.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if t.weight_decay < 0 or not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError("train.weight_decay >= 0, 0 <= train.warmup_ratio < 1, 0 <= min_lr_ratio <= 1")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
        if t.scheduler not in SCHEDULERS:
            raise ConfigError(f"train.scheduler must be one of {SCHEDULERS}, got {t.scheduler!r}")
        if t.stop_after is not None and t.stop_after < 1:
            raise ConfigError(f"train.stop_after must be >= 1 or null, got {t.stop_after}")
        if t.keep_checkpoints is not None and t.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1 or null, got {t.keep_checkpoints}")
        unknown = sorted(set(t.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"train.freeze: unknown part(s) {unknown}; choose from {list(FREEZABLE)}")
        if d.image_size is not None and d.image_size < 16:
            raise ConfigError(f"data.image_size must be >= 16, got {d.image_size}")
        if d.split is not None and d.split not in ("train", "val", "test"):
            raise ConfigError(f"data.split must be train, val, test or null, got {d.split!r}")
        ratios = (d.tasks.seg, d.tasks.seg_answer, d.tasks.vqa)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ConfigError(f"data.tasks ratios must be >= 0 with a positive sum, got {ratios}")
        pbsd = self.model.loss.pbsd
        if t.dssl and pbsd not in (0.0, self.dssl.lambda_pbsd):
            raise ConfigError(
                f"model.loss.pbsd ({pbsd}) differs from dssl.lambda_pbsd ({self.dssl.lambda_pbsd}); "
                "set only dssl.lambda_pbsd (the trainer copies it into model.loss.pbsd)"
            )
        if not str(self.output_dir):
            raise ConfigError("output_dir must be set")
        return self

    @property
    def image_size(self) -> int:
        """Side of the images the data loader produces."""
        if self.data.image_size is not None:
            return self.data.image_size
        return max(self.model.vision.image_size, self.model.backbone.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
            "dssl": self.dssl.to_dict(),
            "output_dir": self.output_dir,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys and badly typed values are :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        data = coerce(cls, data, "")
        model_data = dict(data.get("model") or {})
        if "preset" in model_data:
            from vmad.model.build import preset_config

            model_data = _merge(preset_config(str(model_data["preset"])).to_dict(), model_data)
        kwargs: dict[str, Any] = {"model": VMADConfig.from_dict(model_data)}
        kwargs["data"] = DataConfig(
            **{
                **(data.get("data") or {}),
                "tasks": TaskRatioConfig(**((data.get("data") or {}).get("tasks") or {})),
            }
        )
        kwargs["train"] = TrainLoopConfig(**(data.get("train") or {}))
        kwargs["dssl"] = DSSLConfig.from_dict(data.get("dssl") or {})
        if "output_dir" in data:
            kwargs["output_dir"] = str(data["output_dir"])
        return cls(**kwargs).validate()


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "extra":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------ key / type checks


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce_value(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (Optional, bool, int, float, str, list[...], dict)."""
    opts = _options(tp)
    if value is None:
        if type(None) in opts:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    errors = []
    for opt in opts:
        if opt is type(None):
            continue
        origin = typing.get_origin(opt) or opt
        if is_dataclass(opt):
            if isinstance(value, Mapping):
                return coerce(opt, value, key + ".")
            errors.append("a mapping")
        elif opt is bool:
            if isinstance(value, bool):
                return value
            errors.append("true/false")
        elif opt is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            errors.append("an integer")
        elif opt is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            errors.append("a number")
        elif opt is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            errors.append("a string")
        elif origin is list:
            if isinstance(value, Sequence) and not isinstance(value, str):
                (item,) = typing.get_args(opt) or (Any,)
                return [
                    v if item is Any else _coerce_value(item, v, f"{key}[{i}]") for i, v in enumerate(value)
                ]
            errors.append("a list")
        elif origin is dict:
            if isinstance(value, Mapping):
                return dict(value)
            errors.append("a mapping")
        else:
            return value
    raise ConfigError(f"config key '{key}' must be {' or '.join(errors)}, got {value!r}")


def coerce(cls: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Check ``data``'s keys against dataclass ``cls`` (recursively) and coerce its values to the field
    types. Unknown key: ConfigError naming it and listing the valid keys of its level."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _hints(cls)
    valid = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in valid:
            level = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys {level}: {', '.join(valid)}")
        out[key] = _coerce_value(hints[key], value, prefix + key)
    return out


# ------------------------------------------------------------------------------------ loading / --set


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key=value`` in the raw mapping (sections are created as needed; keys are checked later)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML file, apply ``--set`` overrides, validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return TrainConfig.from_dict(apply_overrides(data, overrides))
