"""The VMAD training loop on Hugging Face Accelerate (paper Sec. III-B/C, Eq. 6-7 and 17; Sec. V-A.4).

One CPU process with ``vmad train``; several GPUs with ``accelerate launch --config_file
configs/accelerate/{ddp,deepspeed_zero2}.yaml -m vmad train ...``. AdamW over the trained parts only (LoRA,
projector, Γ, neck, mask decoder, the added token rows, Meta-Net), a cosine schedule with linear warmup,
gradient accumulation, clipping. Each optimizer step logs the mean of its micro-batches (``loss_bce`` /
``loss_dice`` over the micro-batches that had a segmentation answer, null when none had) to
``<output_dir>/log.jsonl``; checkpoints (:mod:`vmad.train.checkpoint`) hold the trained weights, optimizer
and scheduler state, DSSL memory and box generator, RNG states and the data position, so ``--resume``
continues bit-exactly. ``<output_dir>/final/`` is a ``vmad.model.build.load_pretrained`` folder (without the
training-only DSSL heads, which checkpoints keep in ``dssl.safetensors``).

DeepSpeed: its optimizer state is sharded by the engine and saved with ``accelerator.save_state(...,
safe_serialization=True)``: model weights as safetensors, but DeepSpeed's optimizer shards are written by
``torch.save`` (pickle) - the only pickled files; every other path writes none.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vmad.errors import ConfigError, VMADError
from vmad.model.dssl import resolve_gather_memory
from vmad.tensor_io import save_safetensors
from vmad.train import checkpoint as ckpt
from vmad.train.config import TrainConfig, normalize_saved_config
from vmad.train.dataset import EpochBatches, InstructionDataset, batches_per_epoch, collate
from vmad.train.dssl_loss import DSSLLoss
from vmad.train.losses import LossTerms, TrainingModule, VMADLoss
from vmad.train.priors import training_priors

LOG_NAME = "log.jsonl"
DSSL_WEIGHTS = "dssl.safetensors"  # DSSL heads and Meta-Net in a checkpoint (not in final/)
FINAL_DIR = "final"
LOSS_KEYS = ("loss", "loss_txt", "loss_bce", "loss_dice", "loss_pbsd", "loss_verdict")
N_SUMS = 10  # the entries of _loss_sums
# Config parts that must match for an exact resume.
RESUME_KEYS = ("model", "data", "dssl")
RESUME_TRAIN_KEYS = (
    "batch_size",
    "grad_accum",
    "seed",
    "dssl",
    "lr",
    "weight_decay",
    "betas",
    "eps",
    "freeze",
)


@dataclass
class TrainResult:
    """What a :func:`train` call did: the last optimizer step, where it wrote, whether it stopped early."""

    step: int
    total_steps: int
    output_dir: Path
    final_dir: Path | None
    log_path: Path
    resumed_from: Path | None
    stopped_early: bool


@dataclass
class DataPosition:
    """Where the data stream is: epoch and batches of it consumed by this rank."""

    epoch: int = 0
    batch: int = 0


def lr_factor(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then
    cosine decay to ``floor`` at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# train.freeze names whose parameters are not a top-level module (the two matrices of the added token rows)
PART_PREFIXES = {"new_token_embed": "new_token_rows.embed", "new_token_out": "new_token_rows.out"}


def freeze_parts(model: nn.Module, parts: Sequence[str]) -> int:
    """Stop training the named parts (``train.freeze``: top-level module names, ``lora`` = the LoRA weights);
    returns how many parameters were frozen. A part this model does not train is an error."""
    frozen = 0
    for part in parts:
        prefix = PART_PREFIXES.get(part, part + ".")
        hit = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and (("lora_" in n) if part == "lora" else n.startswith(prefix))
        ]
        if not hit:
            raise ConfigError(f"train.freeze: this model trains no '{part}' parameters")
        for p in hit:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trained parameters in two AdamW groups: decay on matrices, none on biases / norms / 1-d rows (OURS)."""
    decay, plain = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_samples(cfg: TrainConfig) -> list:
    """The training samples (:func:`vmad.train.dataset.load_training_samples`)."""
    from vmad.train.dataset import load_training_samples

    return load_training_samples(cfg.data)


class Trainer:
    """Build everything from a :class:`TrainConfig` and run :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, accelerator: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from vmad.data.prompts import TaskRatios
        from vmad.model.build import build_vmad
        from vmad.model.weights_io import resolve_model_path

        self.cfg = cfg
        t = cfg.train
        self.acc = accelerator or Accelerator(
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.out = Path(cfg.output_dir)
        _seed_all(t.seed + self.rank)
        init_from = resolve_model_path(t.init_from) if t.init_from else None  # checked before reading data
        samples = _load_samples(cfg)
        self.model = build_vmad(cfg.model)
        self._init_model(init_from)
        priors = None
        if self.model.config.mask_decoder.prior_prompt:  # OURS: computed once, cached in output_dir
            priors = training_priors(samples, self.out, cfg.data.prior_group_size, t.seed, self.rank == 0)
        tasks = cfg.data.tasks
        self.dataset = InstructionDataset(
            samples,
            cfg.image_size,
            TaskRatios(tasks.seg, tasks.seg_answer, tasks.vqa, tasks.seg_kind),
            t.seed,
            self.model.config.llm.seg_token,
            priors,
            cfg.data.prior_dropout,
        )
        self.dssl: DSSLLoss | None = None
        if t.dssl:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)
                self.dssl = DSSLLoss(
                    self.model,
                    cfg.dssl,
                    self.dataset.class_sizes(),
                    seed=t.seed * 7919 + self.rank,
                    processes=self.world,
                )
        self.training_module = TrainingModule(self.model, VMADLoss(self.model.config.loss, self.dssl))
        self.training_module.to(self.acc.device)
        self.per_epoch = batches_per_epoch(len(self.dataset), t.batch_size, self.world)
        self.total_steps = t.max_steps or t.epochs * -(-self.per_epoch // t.grad_accum)
        self.optimizer, self.scheduler = self._optimizer_and_schedule()
        self.deepspeed = self.acc.state.deepspeed_plugin is not None
        if self.deepspeed:
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.batch_size
            ds["gradient_accumulation_steps"] = t.grad_accum
            ds["gradient_clipping"] = t.max_grad_norm or 0.0
            ds["zero_allow_untested_optimizer"] = True  # our torch AdamW (param groups), not DeepSpeed's
        self.wrapped, self.opt = self.acc.prepare(self.training_module, self.optimizer)
        self.step = 0
        self.pos = DataPosition()

    def _init_model(self, init_from: Path | None) -> None:
        """Load ``train.init_from`` (OURS parts it lacks, the mask and prior prompts, the verdict head and
        the mask refiner, start fresh; such parts it has and the config lacks are left out), then freeze
        ``train.freeze``."""
        if init_from is not None:
            new_parts = ("mask_prompt.", "mask_decoder.prior_prompt.", "seg_verdict.", "mask_refiner.")
            # an optional part the checkpoint has and this config lacks (e.g. the packaged small's prior
            # prompt when training a recipe without one) is left out
            fresh = self.model.load_trainable(init_from, keep_fresh=new_parts, leave_out=new_parts)
            if fresh and self.rank == 0:
                print(f"{init_from}: {len(fresh)} tensors not in it start fresh "
                      "(mask prompt / prior prompt / verdict / mask refiner)", file=sys.stderr)
        freeze_parts(self.model, self.cfg.train.freeze)

    def _optimizer_and_schedule(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the trained parameters and its warmup + cosine (or constant) schedule."""
        t = self.cfg.train
        warmup = t.warmup_steps or int(round(t.warmup_ratio * self.total_steps))
        optimizer = torch.optim.AdamW(
            param_groups(self.training_module, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps
        )
        schedule = functools.partial(
            lr_factor, warmup=warmup, total=self.total_steps, kind=t.scheduler, floor=t.min_lr_ratio
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ------------------------------------------------------------------ data
    def _stream(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        t = self.cfg.train
        while True:
            sampler = EpochBatches(
                len(self.dataset), t.batch_size, self.pos.epoch, t.seed, self.rank, self.world, self.pos.batch
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=self.cfg.data.num_workers,
                generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
            )
            for raw in loader:
                self.pos.batch += 1
                yield raw
            self.pos.epoch += 1
            self.pos.batch = 0

    def _batch(self, raw: dict[str, Any]) -> dict[str, Any]:
        device = self.acc.device
        batch = self.model.prepare_batch(raw["images"], raw["questions"], raw["answers"], raw["masks"])
        batch["class_names"] = raw["class_names"]
        batch["is_normal"] = raw["is_normal"].to(device)
        batch["normal_descriptions"] = raw["normal_descriptions"]
        if "priors" in raw:
            batch["priors"] = raw["priors"].to(device)
        return batch

    def _prefill(self) -> None:
        """Fill each class's DSSL queue before step 1 (OURS; train.dssl_prefill), model in eval mode."""
        from torch.utils.data import DataLoader

        assert self.dssl is not None
        t = self.cfg.train
        order = EpochBatches(len(self.dataset), t.batch_size, -1, t.seed, self.rank, self.world)
        classes = sorted(self.dataset.class_sizes())
        self.model.eval()
        loader = DataLoader(
            self.dataset,
            batch_sampler=order,
            collate_fn=collate,
            num_workers=self.cfg.data.num_workers,
            generator=torch.Generator().manual_seed(t.seed),
        )
        for raw in loader:
            if self.dssl.memory_full(classes):
                break
            self.dssl.push_only(self.model, self._batch(raw))

    # ------------------------------------------------------------------ checkpoints
    def _config_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.cfg.to_dict()))

    def save_checkpoint(self) -> Path:
        acc, t = self.acc, self.cfg.train
        tmp = ckpt.temp_dir(self.out, self.step)
        if acc.is_main_process:
            ckpt.prepare_temp(self.out, self.step)
        acc.wait_for_everyone()
        if self.deepspeed:  # DeepSpeed shards optimizer state; its shards are pickled by torch.save
            acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        tensors, meta = ckpt.rng_state()
        save_safetensors(tmp / f"rng_rank{self.rank}.safetensors", tensors)
        extra: dict[str, Any] = {"rng": meta, "data": {"epoch": self.pos.epoch, "batch": self.pos.batch}}
        if self.dssl is not None:
            save_safetensors(tmp / f"dssl_rank{self.rank}.safetensors", self.dssl.extra_state())
        ckpt.write_json(tmp / f"rank{self.rank}.json", extra)
        if acc.is_main_process:
            self.model.save_trainable(tmp / "model")
            if self.dssl is not None:
                save_safetensors(tmp / DSSL_WEIGHTS, self.dssl.state_dict())
            if not self.deepspeed:
                tensors, meta = ckpt.optimizer_state(self.optimizer.state_dict())
                save_safetensors(tmp / "optimizer.safetensors", tensors)
                ckpt.write_json(tmp / "optimizer.json", meta)
            ckpt.write_json(tmp / "scheduler.json", ckpt.scheduler_state(self.scheduler.state_dict()))
        acc.wait_for_everyone()
        path = self.out / ckpt.checkpoint_name(self.step)
        if acc.is_main_process:
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "world_size": self.world,
                "deepspeed": self.deepspeed,
                "config": self._config_dict(),
            }
            path = ckpt.commit(self.out, self.step, state)
            ckpt.prune(self.out, t.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_json(path / ckpt.STATE_FILE)
        if state["world_size"] != self.world:
            raise ConfigError(
                f"{path}: written by {state['world_size']} processes, resuming with {self.world}; "
                "an exact resume needs the same number"
            )
        _check_resumable(path, state["config"], self._config_dict(), self.world)
        self.model.load_trainable(path / "model")
        if self.dssl is not None:
            self.dssl.load_state_dict(_dssl_weights(path))
        if self.deepspeed:
            self.acc.load_state(str(path / "accelerate"))
        else:
            meta = ckpt.read_json(path / "optimizer.json")
            tensors = ckpt.load_tensors(path / "optimizer.safetensors")
            self.optimizer.load_state_dict(ckpt.optimizer_state_from(tensors, meta))
            _match_state_shapes(self.optimizer)
        sched = ckpt.read_json(path / "scheduler.json")
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        extra = ckpt.read_json(path / f"rank{self.rank}.json")
        if self.dssl is not None:
            self.dssl.load_extra_state(ckpt.load_tensors(path / f"dssl_rank{self.rank}.safetensors"))
        ckpt.set_rng_state(ckpt.load_tensors(path / f"rng_rank{self.rank}.safetensors"), extra["rng"])
        self.pos = DataPosition(**extra["data"])
        self.step = int(state["step"])

    def save_final(self) -> Path:
        """``final/``: trained weights + config for ``load_pretrained`` (DSSL heads left out)."""
        import shutil

        final = self.out / FINAL_DIR
        if self.acc.is_main_process:
            tmp = self.out / f".{FINAL_DIR}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            self.model.save_trainable(tmp)
            ckpt.write_json(tmp / "train_config.json", self._config_dict())
            old = self.out / f".{FINAL_DIR}.old"
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ log
    def _truncate_log(self, log: Path) -> None:
        """Keep only the entries of steps up to the resumed one (later ones were never checkpointed)."""
        if not (self.acc.is_main_process and log.is_file()):
            return
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by the kill
        ckpt.write_text_atomic(log, "".join(k + "\n" for k in keep))

    def _check_fresh(self, overwrite: bool) -> None:
        import shutil

        existing = ckpt.list_checkpoints(self.out) + [
            p for p in (self.out / LOG_NAME, self.out / FINAL_DIR, self.out / ckpt.LATEST) if p.exists()
        ]
        if not existing:
            return
        if not overwrite:
            raise ConfigError(
                f"{self.out} already holds a run ({existing[0].name}); pass --resume to continue it or "
                "--overwrite to start again"
            )
        if self.acc.is_main_process:
            for p in existing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ loop
    def _optimizer_step(
        self, stream: Iterator[dict[str, Any]], params: list[nn.Parameter], window: torch.Tensor
    ) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; adds their loss sums to ``window``;
        returns the learning rate it used."""
        acc, t = self.acc, self.cfg.train
        sums = torch.zeros(N_SUMS, dtype=torch.float64, device=acc.device)
        for micro in range(t.grad_accum):
            batch = self._batch(next(stream))
            sync = micro == t.grad_accum - 1
            ctx = acc.no_sync(self.wrapped) if not sync and not self.deepspeed else contextlib.nullcontext()
            with ctx, acc.autocast():
                terms = self.wrapped(batch)
            acc.backward(terms.loss / t.grad_accum)
            sums += _loss_sums(terms, sums.device)
        lr = float(self.scheduler.get_last_lr()[0])
        if t.max_grad_norm and not self.deepspeed:
            acc.clip_grad_norm_(params, t.max_grad_norm)
        self.opt.step()
        self.scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        window += acc.reduce(sums, reduction="sum").cpu()
        return lr

    # ------------------------------------------------------------------ loop
    def _resume_from_usable(self, overwrite: bool) -> Path | None:
        """Load the newest complete checkpoint whose files can be read (see :meth:`fit`); None when there is
        no complete checkpoint at all, or (with ``overwrite``) none is usable."""
        candidates = ckpt.resume_candidates(self.out)
        skipped, touched = [], False  # touched: a failed load may have changed the weights or optimizer
        for path in candidates:
            reason = ckpt.unreadable_reason(path)
            if reason is None:
                try:
                    self.load_checkpoint(path)
                except ConfigError:  # the config does not match: the user's to fix, not a damaged file
                    raise
                except (VMADError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                    reason, touched = f"cannot be loaded ({exc})", True
                else:
                    if skipped and self.acc.is_main_process:
                        print(f"resuming from {path.name}, the newest usable checkpoint", file=sys.stderr)
                    return path
            skipped.append(f"{path.name}: {reason}")
            if self.acc.is_main_process:
                print(f"skipping checkpoint {path}: {reason}", file=sys.stderr)
        if not candidates:
            if self.acc.is_main_process:
                print(f"no complete checkpoint in {self.out}; starting from step 0", file=sys.stderr)
            return None
        if not overwrite or touched:  # never silently discard checkpoints that might still be repaired
            raise VMADError(
                f"{self.out}: no usable checkpoint to resume from ({'; '.join(skipped)}); run with "
                "--overwrite (without --resume) to delete them and start again from step 0"
            )
        if self.acc.is_main_process:
            print(f"no usable checkpoint in {self.out}; starting from step 0 (--overwrite)", file=sys.stderr)
        return None

    def _start(self, resume: bool, overwrite: bool) -> Path | None:
        """Clean up after a killed run, resume (or check the folder is fresh and prefill DSSL), trim the
        log to the resumed step and write ``train_config.json``; returns the checkpoint resumed from."""
        acc = self.acc
        if acc.is_main_process:
            for line in ckpt.clean_stale(self.out, FINAL_DIR):
                print(f"{self.out}: {line}", file=sys.stderr)
        acc.wait_for_everyone()
        resumed = self._resume_from_usable(overwrite) if resume else None
        if resumed is None:
            self._check_fresh(overwrite or resume)
            if self.dssl is not None and self.cfg.train.dssl_prefill:
                self._prefill()
        self.out.mkdir(parents=True, exist_ok=True)
        self._truncate_log(self.out / LOG_NAME)
        if acc.is_main_process:
            ckpt.write_text_atomic(self.out / "train_config.json", json.dumps(self._config_dict(), indent=1))
        return resumed

    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or ``train.stop_after``), saving checkpoints and ``final/``.

        Temporary folders left by a killed run (``.checkpoint-N.tmp`` / ``.old``, ``.final.tmp`` / ``.old``)
        are removed first (a checkpoint cut between its two renames is finished or put back). With
        ``resume``, training continues from the newest complete checkpoint whose files can all be read: a
        damaged one (truncated or corrupt safetensors, bad JSON) is skipped with a line on stderr naming it
        and why, and the next older one is tried. With no complete checkpoint at all, training starts from
        step 0 (said on stderr). When checkpoints exist but none is usable, the run is refused (VMADError)
        rather than deleting them, unless ``overwrite`` is also given: then it starts from step 0. A config
        that differs from the checkpoint's is an error, not a reason to fall back."""
        from tqdm import tqdm

        acc, t = self.acc, self.cfg.train
        resumed = self._start(resume, overwrite)
        log_path = self.out / LOG_NAME
        self.training_module.train()
        stream = self._stream()
        params = [p for p in self.training_module.parameters() if p.requires_grad]
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (t.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        window = torch.zeros(N_SUMS, dtype=torch.float64)
        last_saved = self.step if resumed is not None else -1
        stopped = False
        while self.step < self.total_steps:
            lr = self._optimizer_step(stream, params, window)
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                entry = _log_entry(self.step, self.pos.epoch, lr, window, self.dssl is not None)
                window.zero_()
                if acc.is_main_process:
                    with open(log_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(entry) + "\n")
                shown = {
                    k.removeprefix("loss_"): v for k, v in entry.items() if k in LOSS_KEYS and v is not None
                }
                bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if t.save_every and self.step % t.save_every == 0:
                self.save_checkpoint()
                last_saved = self.step
            if t.stop_after is not None and self.step >= t.stop_after and self.step < self.total_steps:
                stopped = True
                break
        bar.close()
        final = None
        if not stopped:
            if last_saved != self.step:
                self.save_checkpoint()
            final = self.save_final()
        return TrainResult(self.step, self.total_steps, self.out, final, log_path, resumed, stopped)


def _check_resumable(
    path: Path, saved_config: dict[str, Any], now: dict[str, Any], processes: int = 1
) -> None:
    """A ConfigError unless the running config matches the checkpoint's where results depend on it
    (configs saved by earlier versions are upgraded first: ``dssl.lambda_pbsd`` -> ``model.loss.pbsd``;
    ``dssl.gather_memory`` is compared as it acts with ``processes`` processes, so null and false agree in
    one process)."""
    try:
        saved = _gather_resolved(normalize_saved_config(saved_config), processes)
    except ConfigError as exc:
        raise ConfigError(f"{path}: its saved config cannot be read ({exc})") from None
    now = _gather_resolved(now, processes)
    diffs = [k for k in RESUME_KEYS if _without(saved.get(k)) != _without(now.get(k))]
    diffs += [f"train.{k}" for k in RESUME_TRAIN_KEYS if saved["train"].get(k) != now["train"].get(k)]
    if not diffs:
        return
    hints = []  # fields whose value for configs saved before they existed is not today's default
    for key in ("dssl.teacher", "dssl.gather_memory", "model.vision.resize", "model.backbone.resize"):
        value, current = _lookup(saved, key), _lookup(now, key)
        if value is not None and value != current:
            shown = json.dumps(value) if isinstance(value, bool) else value
            hints.append(f"its {key} was {shown}: add --set {key}={shown}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ConfigError(f"{path}: the config differs from the checkpoint's in {diffs}; cannot resume{hint}")


def _match_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments saved for a 0-dim parameter that is now ``[1]`` (``mask_decoder.logit_bias`` before
    format version 2) take the parameter's shape."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() == 0 and param.dim() == 1 and param.numel() == 1:
                    if key != "step":
                        optimizer.state[param][key] = value.reshape(1)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a config dict, None when absent."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _gather_resolved(config: dict[str, Any], processes: int) -> dict[str, Any]:
    """``config`` with ``dssl.gather_memory`` as it acts with ``processes`` processes (null -> a bool)."""
    dssl = config.get("dssl")
    if not isinstance(dssl, dict) or "gather_memory" not in dssl:
        return config
    gathered = resolve_gather_memory(dssl["gather_memory"], processes)
    return {**config, "dssl": {**dssl, "gather_memory": gathered}}


def _without(section: Any, keys: tuple[str, ...] = ("num_workers",)) -> Any:
    """A config section without the keys that do not change results."""
    return {k: v for k, v in section.items() if k not in keys} if isinstance(section, dict) else section


def _loss_sums(terms: LossTerms, device: torch.device) -> torch.Tensor:
    """[loss, txt, pbsd, n, bce, dice, n_seg, n_dice, verdict, n_verdict] of one micro-batch (mask terms only
    when it had masks; Dice only when one of them was non-blank, see ``dice_loss``; the verdict term only for
    a model with a verdict head)."""
    has_seg = terms.bce is not None and terms.dice is not None
    has_verdict = terms.verdict is not None
    has_dice = has_seg and terms.dice_masks > 0
    vals = [
        float(terms.loss.detach()),
        float(terms.txt.detach()),
        float(terms.pbsd.detach()) if terms.pbsd is not None else 0.0,
        1.0,
        float(terms.bce.detach()) if has_seg else 0.0,  # type: ignore[union-attr]
        float(terms.dice.detach()) if has_dice else 0.0,  # type: ignore[union-attr]
        1.0 if has_seg else 0.0,
        1.0 if has_dice else 0.0,
        float(terms.verdict.detach()) if has_verdict else 0.0,  # type: ignore[union-attr]
        1.0 if has_verdict else 0.0,
    ]
    return torch.tensor(vals, dtype=torch.float64, device=device)


def _dssl_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DSSL heads and Meta-Net of a checkpoint: ``dssl.safetensors``, or (checkpoints written before it
    existed) the ``aux_modules.pbsd.*`` tensors inside ``model/model.safetensors``."""
    from vmad.model.weights_io import read_trainable

    if (checkpoint / DSSL_WEIGHTS).is_file():
        return ckpt.load_tensors(checkpoint / DSSL_WEIGHTS)
    _, legacy = read_trainable(checkpoint / "model")
    state = {
        k.removeprefix("aux_modules.pbsd."): v for k, v in legacy.items() if k.startswith("aux_modules.pbsd.")
    }
    if not state:
        raise ConfigError(f"{checkpoint}: no DSSL weights ({DSSL_WEIGHTS}) but the config trains with DSSL")
    return state


def _log_entry(step: int, epoch: int, lr: float, w: torch.Tensor, dssl: bool) -> dict[str, Any]:
    n, n_seg, n_dice, n_verdict = float(w[3]), float(w[6]), float(w[7]), float(w[9])
    return {
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "loss": float(w[0]) / n,
        "loss_txt": float(w[1]) / n,
        "loss_bce": float(w[4]) / n_seg if n_seg else None,
        "loss_dice": float(w[5]) / n_dice if n_dice else None,
        "loss_pbsd": float(w[2]) / n if dssl else None,
        "loss_verdict": float(w[8]) / n_verdict if n_verdict else None,
    }


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train by ``cfg`` (see :class:`Trainer`)."""
    return Trainer(cfg).fit(resume=resume, overwrite=overwrite)
