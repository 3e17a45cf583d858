"""Train the full-resolution mask refiner (OURS, :mod:`vmad.model.mask_refiner`) on a frozen model.

Data: normal images from a folder (any layout, searched recursively). Each sample is one of them, reduced to
at most ``max_side`` px, with one synthetic defect (:func:`vmad.data.synth.synthesize`, the six kinds in turn)
on ``defect_fraction`` of the samples and none on the rest; the frozen model's mask logits for it (refiner
off) are computed once: for a model with a normality prior, with its self prior (as a lone image gets with
``--prior folder+self``), except ``without_prior`` of the samples (default none), which go without one (a
single image, ``--prior off``).
Real defects (optional, ``real_samples`` > 0): images of annotated data sets (their train split when they
have one) with their ground-truth masks, ``real_group`` images of one class at a time given to the frozen
model together, so a prior model's logits come with the folder prior (``vmad detect FOLDER``).
Training: random crops (most centred on a defect pixel), BCE + Dice on the refined logits, AdamW.

Nothing done is lost: samples are written in shards of ``shard_size`` (each shard's images and defects come
from its own seed, so a rebuilt shard is the same), the refiner and optimizer every ``save_every`` steps, all
atomically into the work folder; a run started again with the same settings resumes from there, one with
other settings (``settings.json`` there) is refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vmad.data.io import is_image_file, read_image, read_mask
from vmad.data.records import Sample
from vmad.data.synth import SynthConfig, synthesize
from vmad.errors import VMADError
from vmad.model.mask_refiner import MaskRefiner
from vmad.tensor_io import save_safetensors
from vmad.train.checkpoint import load_tensors, optimizer_state, optimizer_state_from

#: (image uint8 [H, W, 3], with its prior?) -> mask logits float [H, W]: the frozen model, refiner off.
CoarseFn = Callable[[np.ndarray, bool], np.ndarray]
#: images of one class, detected together (folder mode) -> their mask logits: the frozen model, refiner off.
FolderCoarseFn = Callable[[list[np.ndarray]], list[np.ndarray]]
CHECKPOINT_NAME = "refiner-checkpoint.safetensors"


@dataclass
class RefinerTrainConfig:
    """Settings of one refiner training (defaults: the packaged small's refiner)."""

    samples: int = 360
    defect_fraction: float = 2 / 3
    without_prior: float = 0.0
    max_side: int = 320
    shard_size: int = 40
    steps: int = 2000
    batch_size: int = 8
    crop: int = 128
    defect_crops: float = 0.7
    lr: float = 2e-3
    weight_decay: float = 1e-4
    save_every: int = 250
    seed: int = 0
    real_samples: int = 0
    real_group: int = 12
    defects: tuple[str, ...] = ()
    defects_split: str = "train"
    shrink_only: bool = False

    def validate(self) -> RefinerTrainConfig:
        if min(self.samples, self.shard_size, self.steps, self.batch_size, self.save_every) < 1:
            raise VMADError("refiner training: samples, shard_size, steps, batch_size and save_every must "
                            "be >= 1")
        if self.real_samples < 0 or self.real_group < 2:
            raise VMADError(f"refiner training: need real_samples >= 0 and real_group >= 2, got "
                            f"{self.real_samples}, {self.real_group}")
        if self.crop < 16 or self.max_side < self.crop:
            raise VMADError(f"refiner training: need 16 <= crop <= max_side, got {self.crop}, "
                            f"{self.max_side}")
        if not all(0.0 <= v <= 1.0 for v in (self.defect_fraction, self.defect_crops, self.without_prior)):
            raise VMADError("refiner training: defect_fraction, defect_crops and without_prior must be in "
                            "[0, 1]")
        return self


def normal_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively, sorted); VMADError naming it when there is none."""
    folder = Path(root)
    if not folder.is_dir():
        raise VMADError(f"{folder}: no such folder of normal images")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise VMADError(f"{folder}: no image files (png, jpg, ...) found in it or below it")
    return files


def defect_samples(roots: list[str | Path], split: str = "train") -> list[Sample]:
    """The samples real defects are drawn from: each data set's ``split``. VMADError for a set without that
    split (so a test split is never used unasked) and when none holds an anomalous image with a mask."""
    from vmad.data.dataset import load_dataset

    pool: list[Sample] = []
    for root in roots:
        ds = load_dataset(root)
        if split not in ds.splits():
            have = ", ".join(ds.splits())
            raise VMADError(f"refiner training: {root}: no {split!r} split (it has: {have}); real defects "
                            "come from the train split so that test images stay unseen (--defects-split "
                            "names another)")
        pool += ds.select(split=split)
    if not any(s.label == 1 and s.mask_path is not None for s in pool):
        raise VMADError(f"refiner training: no anomalous image with a mask in the {split!r} split of "
                        f"{', '.join(map(str, roots))}")
    return pool


def build_real_shard(pool: list[Sample], coarse: FolderCoarseFn, cfg: RefinerTrainConfig, k: int
                     ) -> dict[str, Tensor]:
    """Real shard ``k``: ``real_group`` images of one class (every class as likely, whatever its size), with
    their ground-truth masks and the logits the frozen model gives them detected together."""
    rng = np.random.default_rng([cfg.seed, 2, k])
    names = sorted({s.class_name for s in pool})
    name = names[int(rng.integers(len(names)))]
    same = [s for s in pool if s.class_name == name]
    chosen = [same[int(j)] for j in rng.choice(len(same), size=min(cfg.real_group, len(same)), replace=False)]
    images, masks = [], []
    for sample in chosen:
        try:
            image = _reduced(read_image(sample.image_path), cfg.max_side)
            masks.append(read_mask(sample, image.shape[:2]))
        except VMADError as exc:
            raise VMADError(f"refiner training: {exc}") from None
        images.append(image)
    out: dict[str, Tensor] = {}
    first = cfg.samples + k * cfg.real_group
    for j, (image, mask, logits) in enumerate(zip(images, masks, coarse(images), strict=True)):
        out[f"image.{first + j}"] = torch.from_numpy(np.array(image, dtype=np.uint8))
        out[f"mask.{first + j}"] = torch.from_numpy(mask)
        out[f"logits.{first + j}"] = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return out


def _reduced(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def build_shard(files: list[Path], coarse: CoarseFn, cfg: RefinerTrainConfig, k: int) -> dict[str, Tensor]:
    """Shard ``k``: samples ``k * shard_size`` onwards (image, defect mask, coarse logits per sample)."""
    rng = np.random.default_rng([cfg.seed, k])
    kinds = SynthConfig().kinds
    start = k * cfg.shard_size
    out: dict[str, Tensor] = {}
    for i in range(start, min(cfg.samples, start + cfg.shard_size)):
        path = files[int(rng.integers(len(files)))]
        try:
            image = _reduced(read_image(path), cfg.max_side)
        except VMADError as exc:
            raise VMADError(f"refiner training: {exc}") from None
        mask = np.zeros(image.shape[:2], dtype=bool)
        if rng.random() < cfg.defect_fraction:
            try:
                defect = synthesize(image, rng, kinds[i % len(kinds)])
            except ValueError as exc:  # too small an image for the drawn shape
                raise VMADError(f"{path}: cannot paint a synthetic defect on it ({exc})") from None
            image, mask = defect.image, defect.mask
        out[f"image.{i}"] = torch.from_numpy(np.array(image, dtype=np.uint8))
        out[f"mask.{i}"] = torch.from_numpy(mask)
        with_prior = cfg.without_prior == 0 or bool(rng.random() >= cfg.without_prior)
        out[f"logits.{i}"] = torch.from_numpy(np.asarray(coarse(image, with_prior), dtype=np.float32))
    return out


def load_samples(work: Path, files: list[Path], coarse: CoarseFn, cfg: RefinerTrainConfig,
                 log: Callable[[str], None] = print, real: list[Sample] | None = None,
                 coarse_folder: FolderCoarseFn | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Every sample as (image [3, H, W] in [0, 1], logits [1, H, W], mask [1, H, W] float), building the
    missing shards first: synthetic ``work/samples-KKK.safetensors``, real ``work/real-KKK.safetensors``
    (``cfg.real_samples`` > 0: drawn from ``real`` and given logits by ``coarse_folder``)."""
    samples: list[tuple[Tensor, Tensor, Tensor]] = []
    claim_work(work, cfg)
    n_real = math.ceil(cfg.real_samples / cfg.real_group)
    if n_real and (not real or coarse_folder is None):
        raise VMADError("refiner training: real_samples > 0 needs data sets with defects")
    shards: list[tuple[Path, Callable[[], dict[str, Tensor]]]] = [
        (work / f"samples-{k:03d}.safetensors", lambda k=k: build_shard(files, coarse, cfg, k))
        for k in range(math.ceil(cfg.samples / cfg.shard_size))]
    shards += [(work / f"real-{k:03d}.safetensors",
                lambda k=k: build_real_shard(real or [], coarse_folder, cfg, k))  # type: ignore[arg-type]
               for k in range(n_real)]
    for path, build in shards:
        if not path.is_file():
            start = time.perf_counter()
            save_safetensors(path, build())
            log(f"refiner samples: {path.name} written ({time.perf_counter() - start:.0f} s)")
        shard = load_tensors(path)
        for i in sorted({int(key.split(".")[1]) for key in shard}):
            image = shard[f"image.{i}"].permute(2, 0, 1).float() / 255.0
            samples.append((image, shard[f"logits.{i}"][None].float(), shard[f"mask.{i}"][None].float()))
    return samples


def claim_work(work: Path, cfg: RefinerTrainConfig) -> None:
    """Record ``cfg`` in ``work/settings.json`` (first run) or check that it is the one recorded there: shards
    and checkpoints of other settings are never mixed in. Settings added since a folder was written count at
    their defaults."""
    from vmad.atomic import write_json_atomic

    work.mkdir(parents=True, exist_ok=True)
    path, settings = work / "settings.json", _settings(cfg)
    if path.is_file():
        if _settings(json.loads(path.read_text(encoding="utf-8"))) != settings:
            raise VMADError(f"{work}: holds a refiner training with other settings; use another --out")
    else:
        write_json_atomic(path, settings)


def _settings(cfg: RefinerTrainConfig | dict) -> dict:
    """``cfg`` as JSON-like data, missing fields at their defaults (tuples as lists)."""
    given = asdict(cfg) if isinstance(cfg, RefinerTrainConfig) else cfg
    return json.loads(json.dumps({**asdict(RefinerTrainConfig()), **given}))


def crop_batch(samples: list[tuple[Tensor, Tensor, Tensor]], cfg: RefinerTrainConfig, step: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The crops of training step ``step`` (its own seed: a resumed run sees the same batches); an image
    smaller than the crop is zero-padded (target 0 there)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    images, logits, masks = [], [], []
    c = cfg.crop
    for _ in range(cfg.batch_size):
        image, logit, mask = samples[int(rng.integers(len(samples)))]
        h, w = mask.shape[-2:]
        if mask.any() and rng.random() < cfg.defect_crops:
            ys, xs = torch.nonzero(mask[0], as_tuple=True)
            j = int(rng.integers(len(ys)))
            cy, cx = int(ys[j]), int(xs[j])
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, x0 = int(np.clip(cy - c // 2, 0, max(h - c, 0))), int(np.clip(cx - c // 2, 0, max(w - c, 0)))
        parts = [t[:, y0:y0 + c, x0:x0 + c] for t in (image, logit, mask)]
        pad = (0, c - parts[0].shape[-1], 0, c - parts[0].shape[-2])
        parts = [F.pad(t, pad) for t in parts]
        images.append(parts[0])
        logits.append(parts[1][0])
        masks.append(parts[2][0])
    return torch.stack(images), torch.stack(logits), torch.stack(masks)


def refiner_loss(refined: Tensor, target: Tensor) -> Tensor:
    """BCE + Dice (per crop, smoothed by 1) on the refined logits, as the decoder's Eq. 6 terms."""
    bce = F.binary_cross_entropy_with_logits(refined, target)
    p = torch.sigmoid(refined)
    dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice.mean()


def train_refiner(refiner: MaskRefiner, samples: list[tuple[Tensor, Tensor, Tensor]], cfg: RefinerTrainConfig,
                  work: Path, log: Callable[[str], None] = print) -> list[float]:
    """Train ``refiner`` in place; resumes from ``work/refiner-checkpoint.safetensors`` (weights, optimizer
    and, in its metadata, the step and settings: one file, replaced atomically). Returns the losses of this
    call's steps."""
    from safetensors import safe_open

    opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / CHECKPOINT_NAME
    step = 0
    if ckpt.is_file():
        with safe_open(str(ckpt), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["vmad_refiner"])
        tensors = load_tensors(ckpt)
        if _settings(meta.get("config", {})) != _settings(cfg):
            raise VMADError(f"{work}: holds a refiner training with other settings; use another --out")
        refiner.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict(optimizer_state_from(
            {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"]))
        step = int(meta["step"])
        log(f"refiner training: resumed at step {step}")
    losses: list[float] = []
    refiner.train()
    while step < cfg.steps:
        images, logits, masks = crop_batch(samples, cfg, step)
        loss = refiner_loss(refiner(images, logits), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % cfg.save_every == 0 or step == cfg.steps:
            tensors, opt_meta = optimizer_state(opt.state_dict())
            state = {f"model.{k}": v for k, v in refiner.state_dict().items()}
            meta = {"step": step, "config": asdict(cfg), "optimizer": opt_meta}
            save_safetensors(ckpt, {**state, **{f"opt.{k}": v for k, v in tensors.items()}},
                             metadata={"vmad_refiner": json.dumps(meta)})
            recent = losses[-cfg.save_every:]
            log(f"refiner training: step {step}/{cfg.steps}, loss {sum(recent) / len(recent):.4f}")
    refiner.eval()
    return losses
