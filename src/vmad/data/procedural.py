"""Procedural defect-free images: textured surfaces and parts on a plain background (all OURS).

The real training sets here are three grey textures and one metal part, so a model trained only on them learns
what *those* look like. These images add variety for the synthetic defects of :mod:`vmad.data.synth`: the RIAD
builder paints a defect on each and the mask is exact. Nothing here is drawn from, or tuned on, any evaluation
set; the generators are generic (noise, brushed grain, gratings, cells, smooth gradients; ellipses, rings,
rounded rectangles, polygons).

Output: a folder-format dataset (``docs/data_formats.md``) with two classes, ``surface`` (texture fills the
frame) and ``part`` (one object on a nearly uniform background, so the defect painter keeps defects on the
object), each ``<class>/train/images/NNNNN.png``. Deterministic for a seed; written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from vmad.atomic import atomic_dir
from vmad.data.build_riad import check_output_dir, seeded_rng
from vmad.errors import ConfigError, DataError

CLASSES: tuple[str, ...] = ("surface", "part")
TEXTURES: tuple[str, ...] = ("noise", "brushed", "grating", "cells", "smooth")
SHAPES: tuple[str, ...] = ("ellipse", "ring", "rounded_rect", "polygon")


@dataclass(frozen=True)
class ProceduralConfig:
    """``count``: images per class; ``size``: side in pixels; ``grey_fraction``: share of grey images;
    ``part_scale``: object extent as a fraction of the side."""

    count: int = 200
    size: int = 256
    seed: int = 0
    grey_fraction: float = 0.5
    part_scale: tuple[float, float] = (0.55, 0.95)

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 32:
            raise ConfigError(f"count must be >= 1 and size >= 32, got count={self.count}, size={self.size}")
        lo, hi = self.part_scale
        if not 0.0 < lo <= hi <= 1.0 or not 0.0 <= self.grey_fraction <= 1.0:
            raise ConfigError("part_scale must satisfy 0 < low <= high <= 1 and grey_fraction lie in [0, 1]")


# ------------------------------------------------------------------------------------------ textures


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, (1, 99))
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Fractal noise: octaves of Gaussian-filtered white noise with a random spectral slope."""
    slope = rng.uniform(0.5, 1.5)
    out = np.zeros((n, n))
    for octave in range(int(rng.integers(3, 6))):
        sigma = n / 8 / 2**octave
        out += ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma) * sigma**slope
    return _normalise(out)


def _brushed(rng: np.random.Generator, n: int) -> np.ndarray:
    """Grain along one random direction (brushed or rolled metal, wood, fabric weft)."""
    big = int(n * 1.5)
    grain = ndimage.gaussian_filter(
        rng.standard_normal((big, big)), (rng.uniform(0.5, 2), rng.uniform(8, 40))
    )
    grain = ndimage.rotate(grain, rng.uniform(0, 180), reshape=False, order=1, mode="reflect")
    o = (big - n) // 2
    return _normalise(grain[o : o + n, o : o + n] + 0.3 * _noise(rng, n))


def _grating(rng: np.random.Generator, n: int) -> np.ndarray:
    """Periodic structure: one or two sinusoids (mesh, weave, knurl), optionally hard-edged, plus noise."""
    y, x = np.mgrid[0:n, 0:n] / n
    out = np.zeros((n, n))
    for _ in range(int(rng.integers(1, 3))):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(6, 40)
        out += np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:
        out = np.tanh(3 * out)
    return _normalise(out + rng.uniform(0.1, 0.6) * ndimage.gaussian_filter(rng.standard_normal((n, n)), 1.5))


def _cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """Voronoi cells with random shades and darker borders (grains, pebbles, foam)."""
    k = int(rng.integers(8, 120))
    seeds = np.ones((n, n), dtype=bool)
    seeds[rng.integers(0, n, k), rng.integers(0, n, k)] = False
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
    shade = rng.uniform(0, 1, (n, n))[iy, ix]
    edge = ndimage.morphological_gradient(iy * n + ix, size=2) > 0
    out = shade - rng.uniform(0.2, 0.8) * ndimage.gaussian_filter(edge.astype(float), 0.8)
    return _normalise(out + 0.15 * _noise(rng, n))


def _smooth(rng: np.random.Generator, n: int) -> np.ndarray:
    """A polished surface: a gentle gradient with faint noise."""
    y, x = np.mgrid[0:n, 0:n] / n
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    return _normalise(ramp + rng.uniform(0.05, 0.3) * _noise(rng, n))


_TEXTURE_FNS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": _noise,
    "brushed": _brushed,
    "grating": _grating,
    "cells": _cells,
    "smooth": _smooth,
}


def _colourise(rng: np.random.Generator, t: np.ndarray, grey: bool, lo: float, hi: float) -> np.ndarray:
    """Map a [0, 1] texture to RGB float between two colours of brightness ``lo``..``hi`` (0..255)."""
    a, b = sorted(rng.uniform(lo, hi, 2))
    if b - a < 25:
        a, b = max(0.0, a - 15), min(255.0, b + 15)
    if grey:
        dark, light = np.full(3, a), np.full(3, b)
    else:
        tint = rng.uniform(-1, 1, 3) * rng.uniform(0, 40)
        dark, light = np.clip(a + tint, 0, 255), np.clip(b + tint * rng.uniform(0.3, 1.0), 0, 255)
    return dark + t[..., None] * (light - dark)


def texture(rng: np.random.Generator, n: int, kind: str | None = None) -> np.ndarray:
    """A random [0, 1] texture of side ``n`` (``kind`` from :data:`TEXTURES`, random when None)."""
    kind = kind or TEXTURES[int(rng.integers(len(TEXTURES)))]
    if kind not in _TEXTURE_FNS:
        raise ConfigError(f"texture kind must be one of {', '.join(TEXTURES)}, got {kind!r}")
    return _TEXTURE_FNS[kind](rng, n)


# ------------------------------------------------------------------------------------------- images


def surface_image(rng: np.random.Generator, cfg: ProceduralConfig) -> np.ndarray:
    """A texture filling the frame, uint8 (H, W, 3)."""
    grey = rng.random() < cfg.grey_fraction
    rgb = _colourise(rng, texture(rng, cfg.size), grey, 10, 245)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, n: int, kind: str, extent: float) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(float)
    cy, cx = n / 2 + rng.uniform(-0.08, 0.08) * n, n / 2 + rng.uniform(-0.08, 0.08) * n
    r = extent * n / 2
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    aspect = rng.uniform(0.5, 1.0) if kind != "ring" else rng.uniform(0.85, 1.0)
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    if kind == "ring":
        d = np.hypot(u / r, v / (r * aspect))
        return (d <= 1) & (d >= rng.uniform(0.25, 0.7))
    if kind == "rounded_rect":
        corner = rng.uniform(0.05, 0.5) * r * aspect
        qu, qv = np.abs(u) - (r - corner), np.abs(v) - (r * aspect - corner)
        return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0) <= corner
    if kind == "polygon":
        sides = int(rng.integers(3, 9))
        theta = np.arctan2(v, u)
        sector = 2 * np.pi / sides
        return np.hypot(u, v) * np.cos((theta % sector) - sector / 2) <= r * np.cos(sector / 2)
    raise ConfigError(f"shape must be one of {', '.join(SHAPES)}, got {kind!r}")


def _touches_border(mask: np.ndarray, margin: int = 3) -> bool:
    inner = np.zeros_like(mask)
    inner[margin:-margin, margin:-margin] = True
    return bool((mask & ~inner).any())


def part_image(rng: np.random.Generator, cfg: ProceduralConfig) -> np.ndarray:
    """One textured, shaded object on a nearly uniform background, uint8 (H, W, 3)."""
    n = cfg.size
    grey = rng.random() < cfg.grey_fraction
    dark_bg = rng.random() < 0.5
    bg_level = rng.uniform(5, 60) if dark_bg else rng.uniform(190, 250)
    background = _colourise(rng, np.zeros((n, n)), grey, bg_level, bg_level + 1)
    background = background + rng.normal(0, rng.uniform(0.5, 3.0), (n, n))[..., None]
    lo, hi = (110, 245) if dark_bg else (15, 150)
    fill = _colourise(rng, texture(rng, n), grey, lo, hi)
    kind, extent = SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(*cfg.part_scale)
    shape = _shape_mask(rng, n, kind, extent)
    while _touches_border(shape):  # keep the whole part in frame so the border stays background
        extent *= 0.9
        shape = _shape_mask(rng, n, kind, extent)
    y, x = np.mgrid[0:n, 0:n] / n
    light = 1 + rng.uniform(0, 0.25) * (np.cos(rng.uniform(0, 2 * np.pi)) * (x - 0.5) + (y - 0.5))
    alpha = ndimage.gaussian_filter(shape.astype(float), 0.8)[..., None]
    rgb = background * (1 - alpha) + fill * light[..., None] * alpha
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


_IMAGE_FNS: dict[str, Callable[[np.random.Generator, ProceduralConfig], np.ndarray]] = {
    "surface": surface_image,
    "part": part_image,
}


def write_procedural(
    out: str | Path, cfg: ProceduralConfig, overwrite: bool = False, progress: bool = False
) -> Path:
    """Write ``cfg.count`` images per class of :data:`CLASSES` to ``out`` (folder format, ``train`` split)."""
    out = Path(out)
    check_output_dir(out, [], overwrite)
    try:
        with (
            atomic_dir(out) as tmp,
            tqdm(total=cfg.count * len(CLASSES), disable=not progress, desc="procedural") as bar,
        ):
            for name in CLASSES:
                folder = tmp / name / "train" / "images"
                folder.mkdir(parents=True)
                for i in range(cfg.count):
                    image = _IMAGE_FNS[name](seeded_rng(cfg.seed, name, i, cfg.size), cfg)
                    Image.fromarray(image).save(folder / f"{i:05d}.png")
                    bar.update()
    except OSError as exc:
        raise DataError(exc.filename or out, f"cannot write the output ({exc.strerror or exc})") from None
    return out
