"""Cost of DSSL's N_b patch tokens T_v per image, both ways (paper Eq. 12 vs the OURS ROI variant).

- ``crop`` (paper): crop the N_b boxes from the image, resample each to the vision encoder's input size, run
  F_I (EfficientNet-Lite0 stride-16 blocks, the small preset's encoder) and Psi (LTC) on every crop, mean-pool
  each crop's tokens. Timed with and without Psi.
- ``roi`` (OURS): ROI-align on the token grid Psi already produced for the whole image (the LLM input), then
  average the bins. The whole-image F_I + Psi pass is needed anyway for the LLM, so it is reported apart.

Also prints how close the two are at the encoder level (no Psi, so no random weights involved): the mean
cosine between a crop's mean-pooled last-layer feature and the ROI average of the whole image's feature map.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dssl.py [key=value ...]
keys: batch (2), num_boxes (32), box_size (32), image_size (384, the small preset's encoder input),
llm_dim (576, SmolLM2-135M), repeats (3), chunk (16), image (a real image path; default the first
MVTec AD bottle test image under ../shared/data, else random pixels).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vmad.model.build import build_projector
from vmad.model.config import VisionConfig
from vmad.model.dssl import DSSLConfig, crop_patch_tokens, sample_boxes
from vmad.model.efficientnet import load_efficientnet_lite0
from vmad.model.image_encoders import EfficientNetVisionEncoder
from vmad.model.layers import tokens_to_map
from vmad.model.projectors import ProjectorConfig
from vmad.model.roi import crop_patches, roi_tokens

DEFAULTS = {
    "batch": 2,
    "num_boxes": 32,
    "box_size": 32,
    "image_size": 384,
    "llm_dim": 576,
    "repeats": 3,
    "chunk": 16,
    "image": "",
}


def parse(argv: list[str]) -> dict[str, object]:
    opts: dict[str, object] = dict(DEFAULTS)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; known: {sorted(opts)}")
        opts[key] = value if key == "image" else int(value)
    return opts


def load_images(path: str, batch: int, size: int) -> tuple[torch.Tensor, str]:
    """[batch, 3, size, size] in [0, 1]: a real image if available, else uniform noise."""
    from PIL import Image

    candidates = (
        [Path(path)]
        if path
        else sorted(
            (
                Path(__file__).resolve().parents[2]
                / "shared"
                / "data"
                / "mvtec_ad"
                / "bottle"
                / "test"
                / "broken_large"
            ).glob("*.png")
        )[:batch]
    )
    if candidates and all(p.is_file() for p in candidates):
        imgs = []
        for p in (candidates * batch)[:batch]:
            a = np.asarray(
                Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32
            )
            imgs.append(torch.from_numpy(a / 255.0).permute(2, 0, 1))
        return torch.stack(imgs), ", ".join(p.name for p in candidates)
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)), "random pixels"


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[tuple[float, float], torch.Tensor]:
    """(median, min) seconds over ``repeats`` runs after one warm-up, and the last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return (statistics.median(times), min(times)), out


@torch.no_grad()
def main(argv: list[str]) -> None:
    o = parse(argv)
    bsz, nb, size = int(o["batch"]), int(o["num_boxes"]), int(o["image_size"])
    torch.manual_seed(0)
    vcfg = VisionConfig(kind="efficientnet_lite0", image_size=size, n_levels=4)
    encoder = EfficientNetVisionEncoder(load_efficientnet_lite0(pretrained=True), vcfg)
    grid = encoder.grid
    proj = build_projector(
        ProjectorConfig(kind="ltc"), encoder.out_dim, encoder.level_dims, int(o["llm_dim"]), grid
    )
    proj.eval()
    cfg = DSSLConfig(num_boxes=nb, box_size=int(o["box_size"]), crop_input_size=size)
    images, image_desc = load_images(str(o["image"]), bsz, size)
    boxes = sample_boxes(bsz, size, cfg, torch.Generator().manual_seed(0))
    reps, chunk = int(o["repeats"]), int(o["chunk"])

    def psi_encode(x: torch.Tensor) -> torch.Tensor:
        last, levels = encoder(x)
        return proj(last, levels)

    def enc_only(x: torch.Tensor) -> torch.Tensor:
        return encoder(x)[0]

    # whole image pass (needed for the LLM in both modes)
    t_full, vis = timed(lambda: psi_encode(images), reps)
    side = int(round(vis.shape[1] ** 0.5))
    token_grid = tokens_to_map(vis, side)
    stride = size / side
    t_roi, tv_roi = timed(lambda: roi_tokens(token_grid, boxes, stride, 2, 2), max(reps, 20))
    t_crop_only, crops = timed(lambda: crop_patches(images, boxes, size), reps)
    t_crop_enc, tv_enc = timed(lambda: crop_patch_tokens(images, boxes, enc_only, size, chunk), reps)
    t_crop, tv_crop = timed(lambda: crop_patch_tokens(images, boxes, psi_encode, size, chunk), reps)

    # encoder-level agreement of the two ways (pretrained weights only)
    last_full = encoder(images)[0]
    fmap = tokens_to_map(last_full, grid)
    roi_enc = roi_tokens(fmap, boxes, size / grid, 2, 2)
    cos_enc = F.cosine_similarity(tv_enc, roi_enc, dim=-1)
    cos_psi = F.cosine_similarity(tv_crop, tv_roi, dim=-1)

    per = 1000.0 / bsz
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"command: OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/bench_dssl.py "
        + " ".join(argv)
    )
    print(
        f"setup: batch {bsz}, N_b {nb}, box {cfg.box_size}px, encoder input {size}px (grid {grid}x{grid}), "
        f"Psi = LTC (default ProjectorConfig, random init) to D={o['llm_dim']} -> {side}x{side} tokens; "
        f"image: {image_desc}; median of {reps} runs after a warm-up; chunk {chunk} crops per encoder call"
    )
    print(f"crops tensor: {tuple(crops.shape)}")
    rows = [
        ("whole image F_I + Psi (LLM input, both modes)", t_full),
        ("roi: ROI-align on Psi token grid", t_roi),
        ("crop: crop + resample only", t_crop_only),
        ("crop: crop + F_I (no Psi)", t_crop_enc),
        ("crop: crop + F_I + Psi (paper Eq. 12)", t_crop),
    ]
    print("| step | median ms per image | min ms per image |")
    print("|---|---:|---:|")
    for name, (med, best) in rows:
        print(f"| {name} | {med * per:.2f} | {best * per:.2f} |")
    print(
        f"crop / roi cost ratio of T_v (medians): {t_crop[0] / t_roi[0]:.0f}x; "
        f"crop T_v / whole-image F_I + Psi: {t_crop[0] / t_full[0]:.1f}x"
    )
    print(
        f"cosine(crop, roi) at the encoder level (pretrained F_I, no Psi): mean {cos_enc.mean():.3f}, "
        f"min {cos_enc.min():.3f}"
    )
    print(f"cosine(crop, roi) after Psi (random LTC): mean {cos_psi.mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
