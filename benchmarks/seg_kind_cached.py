"""Experiment (OURS, issue 14, not a shipped recipe): Γ and the mask decoder trained for referring
segmentation on cached inputs, so that many more steps fit on a CPU than `vmad train vmad_small_kind` gives.

With the LLM, the encoders and the neck frozen, the decoder's inputs for one example are fixed: the image
embedding f and H̄_seg (Eq. 4-5). `cache` draws examples from the training dataset exactly as `vmad train`
does with `data.tasks {seg: 1, seg_kind: 2}` (`vmad.train.dataset.InstructionDataset`, seed 7), runs the
model on each (the inference path, single image) and stores f (float16), H̄_seg and the target mask. `train`
fits Γ and the decoder on them (AdamW, one-cycle, batch 8, 2 BCE + 0.5 Dice as `model.loss`) and writes a
weights folder `vmad detect` / `seg_kind_referring.py` load; `--mask-query seg_state` also switches the
decoder's mask read-out to the H_seg token (`model.mask_decoder.mask_query`).

    python benchmarks/seg_kind_cached.py cache --data RIAD --examples 1500 --cache FILE
    python benchmarks/seg_kind_cached.py cache --data RIAD --examples 3000 --epoch 1 --cache FILE2
    python benchmarks/seg_kind_cached.py train --cache FILE [FILE2 ...] --steps 2000 --lr 3e-4 \
        --mask-query seg_state --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vmad.atomic import atomic_path
from vmad.data.prompts import TaskRatios
from vmad.infer.detector import Detector, DetectorConfig
from vmad.model.mask_decoder import bce_loss, dice_loss
from vmad.model.weights_io import save_trainable
from vmad.train.config import DataConfig
from vmad.train.dataset import InstructionDataset, load_training_samples

SIZE = 384


def cache(detector: Detector, data: str, n: int, out: Path, epoch: int = 0) -> None:
    """Store f, H̄_seg, the target and the question of ``n`` training examples (drawn as in ``epoch``)."""
    model = detector.model
    samples = load_training_samples(DataConfig(root=data))
    dataset = InstructionDataset(samples, SIZE, TaskRatios(1.0, 0.0, 0.0, 2.0), seed=7, announce=False)
    keys = np.random.default_rng(7).permutation(len(samples))[:n]
    n = len(keys)
    captured: dict[str, torch.Tensor] = {}
    original = type(model).mask_logits

    def capture(encoded, h_seg, size):  # noqa: ANN001, ANN202
        captured["f"] = model.image_embeddings(encoded).detach().half()
        captured["h"] = h_seg.detach().clone()
        return original(model, encoded, h_seg, size)

    model.mask_logits = capture
    rows: dict[str, list] = {"f": [], "h": [], "mask": [], "question": []}
    start = time.time()
    for j, key in enumerate(keys):
        item = dataset[(epoch, int(key))]
        image = (item.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        detector.detect([image], question=item.question)
        rows["f"].append(captured["f"])
        rows["h"].append(captured["h"])
        rows["mask"].append(item.mask.bool())
        rows["question"].append(item.question)
        if j % 100 == 0:
            print(f"{j}/{n} examples, {time.time() - start:.0f} s", flush=True)
    del model.mask_logits
    with atomic_path(out) as tmp:
        torch.save({"f": torch.cat(rows["f"]), "h": torch.cat(rows["h"]), "mask": torch.stack(rows["mask"]),
                    "question": rows["question"]}, tmp)


def load_caches(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of several cache files, concatenated."""
    parts = [torch.load(p) for p in paths]
    return {key: torch.cat([part[key] for part in parts]) for key in ("f", "h", "mask")}


def train(
    detector: Detector, cached: list[Path], steps: int, lr: float, mask_query: str | None, out: Path
) -> None:
    """Fit Γ and the mask decoder on the ``cached`` examples; save the model's trained parts to ``out``."""
    model = detector.model
    if mask_query is not None:
        model.mask_decoder.mask_query = mask_query
        model.config.mask_decoder = dataclasses.replace(model.config.mask_decoder, mask_query=mask_query)
    data = load_caches(cached)
    n = len(data["h"])
    params = [*model.seg_head.parameters(), *model.mask_decoder.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    frame = model.visual_backbone if model.visual_backbone is not None else model.vision_encoder
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, n, (8,), generator=generator)
        low = model.mask_decoder(data["f"][idx].float(), model.seg_head(data["h"][idx])[:, None], None)
        logits = frame.to_image(low.float(), (SIZE, SIZE))[:, 0]
        target = data["mask"][idx].float()
        loss = 2.0 * bce_loss(logits, target) + 0.5 * dice_loss(logits, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    model.eval()
    save_trainable(model, out)
    print(f"saved {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("cache", "train"))
    parser.add_argument("--model", default="small", help="the weights to start from")
    parser.add_argument("--data", help="training data (cache): a RIAD-format folder")
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--cache", type=Path, nargs="+", required=True,
                        help="the cache file to write (cache), or the files to train on (train)")
    parser.add_argument("--epoch", type=int, default=0, help="cache: draw the examples as in this epoch")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--mask-query", choices=("mask_token", "seg_state"), default=None)
    parser.add_argument("--out", type=Path, help="weights folder to write (train)")
    args = parser.parse_args()
    torch.manual_seed(0)
    detector = Detector.from_pretrained(args.model, config=DetectorConfig(prior="off"))
    if args.phase == "cache":
        if not args.data:
            parser.error("cache needs --data")
        if len(args.cache) != 1:
            parser.error("cache writes one file")
        cache(detector, args.data, args.examples, args.cache[0], args.epoch)
    else:
        if args.out is None:
            parser.error("train needs --out")
        missing = [str(p) for p in args.cache if not p.is_file()]
        if missing:
            parser.error(f"cache file not found: {', '.join(missing)}")
        train(detector, args.cache, args.steps, args.lr, args.mask_query, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
