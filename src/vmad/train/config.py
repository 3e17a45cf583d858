"""Training configuration: one YAML file with ``model``, ``data``, ``train``, ``dssl`` and ``output_dir``.

``model`` is :class:`vmad.model.config.VMADConfig`: a section naming ``preset`` starts from that preset and
overrides the keys it lists (:func:`resolve_model_section`). ``dssl`` is :class:`vmad.model.dssl.DSSLConfig`.
``--set key=value`` overrides any key by its dotted path. :func:`vmad.config.from_mapping` builds it all
(values coerced to the field types, ``Literal`` values checked, an unknown key an error listing the valid
ones). Configs saved by earlier versions are read through :func:`upgrade_legacy`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmad.config import apply_overrides, check_choices, from_mapping, merge, to_dict
from vmad.data.dataset import DataOptions
from vmad.errors import ConfigError
from vmad.model.config import VMADConfig, upgrade_legacy_model
from vmad.model.dssl import DSSLConfig

Scheduler = Literal["cosine", "constant"]
Split = Literal["train", "val", "test"]
FREEZABLE = (
    "projector",
    "seg_head",
    "neck",
    "mask_decoder",
    "mask_prompt",
    "seg_verdict",
    "mask_refiner",
    "new_token_rows",
    "new_token_embed",
    "new_token_out",
    "lora",
)


@dataclass
class TaskRatioConfig:
    """Relative frequencies of the paper's three task types (Sec. V-A.2; OURS: the paper gives none) and of
    OURS referring segmentation by defect kind (``seg_kind``, :func:`vmad.data.prompts.kind_conversation`)."""

    seg: float = 1.0
    seg_answer: float = 1.0
    vqa: float = 1.0
    seg_kind: float = 0.0


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
        options: the readers' options (:class:`vmad.data.DataOptions`, as ``--mask-name`` / ``--data-opt``
            of ``vmad data inspect``; ``vmad train --mask-name`` / ``--data-opt`` set them). OURS: for
            training, a folder-format dataset without split folders is the ``train`` split (unless
            ``options.folder.default_split`` says otherwise; ``vmad data inspect`` and ``vmad eval`` read it
            as ``test``).
        prior_group_size: OURS, for ``model.mask_decoder.prior_prompt``: training images of a class are
            scored for their normality prior in groups of this size (:mod:`vmad.train.priors`).
        prior_dropout: OURS: fraction of samples trained without their prior (the model must also work
            without one: a single image with no references).
    """

    root: str | None = None
    format: str | None = None
    split: Split | None = "train"
    classes: list[str] | None = None
    image_size: int | None = None
    tasks: TaskRatioConfig = field(default_factory=TaskRatioConfig)
    num_workers: int = 0
    options: DataOptions = field(default_factory=DataOptions)
    prior_group_size: int = 64
    prior_dropout: float = 0.25


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
        dssl: add DSSL's L_pbsd (Eq. 17) to the loss, weighted by ``model.loss.pbsd`` (Eq. 7).
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
            ``mask_decoder``, ``mask_prompt``, ``seg_verdict``, ``new_token_rows`` (or one of its two
            matrices, ``new_token_embed`` / ``new_token_out``), ``lora`` (with ``init_from``: e.g. keep the
            masks of a trained model while its answers are fine-tuned). They are still saved with the rest.
    """

    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Scheduler = "cosine"
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
        self.model.validate()
        self.dssl.validate()
        check_choices(self.data, "data")
        check_choices(self.train, "train")
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
        if t.stop_after is not None and t.stop_after < 1:
            raise ConfigError(f"train.stop_after must be >= 1 or null, got {t.stop_after}")
        if t.keep_checkpoints is not None and t.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1 or null, got {t.keep_checkpoints}")
        unknown = sorted(set(t.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"train.freeze: unknown part(s) {unknown}; choose from {list(FREEZABLE)}")
        if d.image_size is not None and d.image_size < 16:
            raise ConfigError(f"data.image_size must be >= 16, got {d.image_size}")
        ratios = (d.tasks.seg, d.tasks.seg_answer, d.tasks.vqa, d.tasks.seg_kind)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ConfigError(f"data.tasks ratios must be >= 0 with a positive sum, got {ratios}")
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
        """A plain nested dict, tuples as lists (as JSON and YAML give them back)."""
        return _lists(to_dict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (legacy keys upgraded, the model preset resolved) and validate."""
        data = upgrade_legacy(data)
        if "model" in data:
            data["model"] = resolve_model_section(data["model"])
        return from_mapping(cls, data, "").validate()


def _lists(value: Any) -> Any:
    """``value`` with every tuple turned into a list, recursively."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def resolve_model_section(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``model:`` section naming ``preset``: that preset's full dict (``vmad.model.build.preset_config``)
    deep-merged with the section's other keys; without ``preset``, the section itself (dataclass defaults)."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"model must be a mapping, got {type(section).__name__}")
    section = dict(section or {})
    if "preset" not in section:
        return section
    from vmad.model.build import preset_config

    return merge(preset_config(str(section["preset"])).to_dict(), section)


def upgrade_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A training config as written by earlier versions, in today's shape: ``dssl.lambda_pbsd`` (before λ_pbsd
    had one place) moves to ``model.loss.pbsd`` (whatever ``train.dssl`` says), an empty ``model.loss.extra``
    is dropped, and a saved ``dssl`` section without ``teacher`` (before that field existed) gets the teacher
    it was trained with, ``separate`` (:meth:`DSSLConfig.upgrade_legacy`; a hand-written partial section and a
    run saved with ``train.dssl: false``, which built no teacher, keep the default)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    dssl = data.get("dssl")
    if isinstance(dssl, Mapping) and "lambda_pbsd" in dssl:
        data["dssl"] = {key: value for key, value in dssl.items() if key != "lambda_pbsd"}
        model = data.get("model") if isinstance(data.get("model"), Mapping) else {}
        loss = model.get("loss") if isinstance(model.get("loss"), Mapping) else {}
        data["model"] = {**model, "loss": {**loss, "pbsd": dssl["lambda_pbsd"]}}
    train = data.get("train") if isinstance(data.get("train"), Mapping) else {}
    if isinstance(data.get("dssl"), Mapping) and train.get("dssl", True) is not False:
        data["dssl"] = DSSLConfig.upgrade_legacy(data["dssl"])
    if isinstance(data.get("model"), Mapping):
        data["model"] = upgrade_legacy_model(data["model"])
    return data


def normalize_saved_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by a training run (``train_config.json``, a checkpoint's ``state.json``), old or new,
    in the shape of :meth:`TrainConfig.to_dict` now (for comparison with the running config)."""
    return TrainConfig.from_dict(data).to_dict()


def packaged_configs() -> dict[str, Path]:
    """The YAML files shipped in the package (``vmad/configs/``) by name: ``tiny``, ``small``, ``paper``,
    ``vmad_small``, ... and ``accelerate/ddp``, ``accelerate/deepspeed_zero2`` (for ``accelerate launch``)."""
    import importlib.resources

    root = Path(str(importlib.resources.files("vmad").joinpath("configs")))
    if not root.is_dir():
        return {}
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def resolve_config_path(ref: str | Path) -> Path:
    """A training config given as a file path (used when the file exists) or as the name of a packaged
    config (``tiny``, ``vmad_small_stage2``; ``.yaml`` optional); ConfigError listing the names otherwise."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    configs = packaged_configs()
    name = str(ref)[: -len(".yaml")] if str(ref).endswith(".yaml") else str(ref)
    if name in configs:
        return configs[name]
    names = ", ".join(n for n in configs if not n.startswith("accelerate/"))
    raise ConfigError(f"{ref}: no such config file, nor a packaged config name (names: {names})")


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML file (a path, or a packaged config's name: :func:`resolve_config_path`), apply
    ``--set`` overrides, resolve the model preset, validate."""
    import yaml

    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return TrainConfig.from_dict(apply_overrides(data, overrides))
