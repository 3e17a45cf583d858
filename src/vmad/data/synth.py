"""Synthetic defects with exact masks, placed on normal images by the RIAD builder.

RIAD (paper Sec. IV) pairs every image with a defect mask; the paper has no synthetic data, so everything
here is OURS: six kinds (``SYNTHETIC_KINDS``) drawn with PIL / NumPy and blended into the image.

Exactness: a defect is an opacity map ``alpha`` (cut to 0 below ``SynthConfig.alpha_floor``) and a target
appearance; the output is ``image * (1 - alpha) + target * alpha`` inside ``alpha > 0`` and the input
elsewhere, and any pixel inside whose value did not change by rounding is nudged by
``SynthConfig.nudge`` grey levels. So the returned mask is exactly the set of changed pixels.
Grey images (three equal channels) stay grey.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from vmad.errors import ConfigError

SYNTHETIC_KINDS: tuple[str, ...] = (
    "scratch",
    "crack",
    "spot",
    "contamination",
    "missing_piece",
    "foreign_texture",
)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic defects (all OURS).

    ``size_range``: defect extent as a fraction of the image's shorter side. ``contrast_range``: intensity
    change as a fraction of 255. ``foreground_*``: an image whose border is nearly uniform
    (grey-level std <= ``foreground_border_std``) may be an object on a background; its object is the
    pixels farther than max(``foreground_threshold``, 3 x border std) from the border's median colour, and
    defects stay on it when it covers ``foreground_fraction`` of the image (otherwise the whole image is
    the surface, as for textures like Magnetic-tile or NEU-Seg).
    """

    kinds: tuple[str, ...] = SYNTHETIC_KINDS
    size_range: tuple[float, float] = (0.12, 0.4)
    contrast_range: tuple[float, float] = (0.25, 0.55)
    alpha_floor: float = 0.3
    nudge: int = 6
    min_pixels: int = 8
    max_tries: int = 10
    foreground_threshold: float = 30.0
    foreground_border_std: float = 20.0
    foreground_fraction: tuple[float, float] = (0.1, 0.9)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in SYNTHETIC_KINDS]
        if not self.kinds or unknown:
            raise ConfigError(f"synthetic kinds must be among {', '.join(SYNTHETIC_KINDS)}, got {self.kinds}")
        for name in ("size_range", "contrast_range", "foreground_fraction"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if not 0.0 < self.alpha_floor <= 1.0 or not 1 <= self.nudge <= 127:
            raise ConfigError("alpha_floor must lie in (0, 1] and nudge in [1, 127]")


@dataclass(frozen=True)
class SynthDefect:
    """The defective image (H, W, 3) uint8, its exact mask (H, W) bool and the defect kind."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


@dataclass(frozen=True)
class _Ctx:
    img: np.ndarray  # (H, W, 3) float32
    foreground: np.ndarray | None
    cfg: SynthConfig

    @property
    def h(self) -> int:
        return self.img.shape[0]

    @property
    def w(self) -> int:
        return self.img.shape[1]

    @property
    def side(self) -> int:
        return min(self.h, self.w)


# ------------------------------------------------------------------------------------------- helpers


def is_grey(image: np.ndarray) -> bool:
    """True when the three channels are equal everywhere."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def estimate_foreground(image: np.ndarray, cfg: SynthConfig = SynthConfig()) -> np.ndarray | None:
    """The object of an object-on-background image (bool (H, W)), or None for a surface / texture image
    (OURS heuristic: a nearly uniform border is background; see :class:`SynthConfig`)."""
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    border_std = float(border.mean(axis=1).std())
    if border_std > cfg.foreground_border_std:
        return None
    colour = np.median(border, axis=0)
    fg = np.abs(img - colour).max(axis=2) > max(cfg.foreground_threshold, 3 * border_std)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=2))
    lo, hi = cfg.foreground_fraction
    return fg if lo <= fg.mean() <= hi else None


def _center(rng: np.random.Generator, ctx: _Ctx) -> tuple[float, float]:
    if ctx.foreground is not None:
        ys, xs = np.nonzero(ctx.foreground)
        i = int(rng.integers(len(ys)))
        return float(ys[i]), float(xs[i])
    my, mx = 0.15 * ctx.h, 0.15 * ctx.w
    return float(rng.uniform(my, ctx.h - my)), float(rng.uniform(mx, ctx.w - mx))


def _local_mean(img: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    r = max(2, int(r))
    y0, x0 = max(0, int(cy) - r), max(0, int(cx) - r)
    return img[y0 : int(cy) + r + 1, x0 : int(cx) + r + 1].reshape(-1, 3).mean(axis=0)


def _canvas(ctx: _Ctx) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (ctx.w, ctx.h), 0)
    return canvas, ImageDraw.Draw(canvas)


def _blob(cy: float, cx: float, r: float, rng: np.random.Generator, jitter: float = 0.3) -> list[tuple]:
    """An irregular closed outline: an ellipse whose radius varies smoothly with the angle."""
    n = 32
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    for k in (2, 3, 5):
        radius += jitter / k * rng.uniform(0.5, 1.0) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    aspect, rot = rng.uniform(0.55, 1.0), rng.uniform(0, np.pi)
    x, y = r * radius * np.cos(angles), r * aspect * radius * np.sin(angles)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(x, y, strict=True)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field in [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma, 0.5))
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo + 1e-8)


def _shifted(base: np.ndarray, delta: float, lighter: bool) -> np.ndarray:
    return np.clip(base + (delta if lighter else -delta), 0, 255)


# ---------------------------------------------------------------------------------------------- kinds

_Kind = Callable[[_Ctx, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _scratch(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-3 thin, slightly curved, nearly parallel lines, lighter (60 %) or darker than the surface."""
    cy, cx = _center(rng, ctx)
    size = rng.uniform(*ctx.cfg.size_range) * ctx.side * 1.5
    canvas, draw = _canvas(ctx)
    angle = rng.uniform(0, np.pi)
    d, p = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    width = max(1, round(ctx.side * rng.uniform(0.004, 0.012)))
    for i in range(1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
        length = size * rng.uniform(0.6, 1.1)
        c = np.array([cx, cy]) + p * (i * rng.uniform(2, 6) * width) + d * rng.uniform(-0.1, 0.1) * size
        p0, p2 = c - d * length / 2, c + d * length / 2
        p1 = c + p * rng.uniform(-0.12, 0.12) * length
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(q) for q in pts], fill=255, width=width, joint="curve")
    alpha = np.asarray(canvas, dtype=np.float32) / 255 * rng.uniform(0.75, 1.0)
    base = _local_mean(ctx.img, cy, cx, size / 4)
    delta = rng.uniform(*ctx.cfg.contrast_range) * 255
    lighter = bool(rng.random() < 0.6)
    target = 0.5 * _shifted(ctx.img, delta, lighter) + 0.5 * _shifted(base, delta, lighter)
    return alpha, target


def _walk(rng, start, angle, step, steps) -> list[tuple[float, float]]:
    pts, pos = [tuple(start)], np.array(start, dtype=np.float64)
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        pos = pos + step * np.array([math.cos(angle), math.sin(angle)])
        pts.append((float(pos[0]), float(pos[1])))
    return pts


def _crack(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, jagged random walk in both directions from a point, sometimes with side branches."""
    cy, cx = _center(rng, ctx)
    size = rng.uniform(*ctx.cfg.size_range) * ctx.side * 1.5
    step = max(1.5, ctx.side * 0.015)
    steps = max(2, int(size / step / 2))
    angle = rng.uniform(0, 2 * np.pi)
    canvas, draw = _canvas(ctx)
    width = max(1, round(ctx.side * rng.uniform(0.003, 0.009)))
    arms = [_walk(rng, (cx, cy), angle, step, steps), _walk(rng, (cx, cy), angle + np.pi, step, steps)]
    for arm in list(arms):
        if rng.random() < 0.5:
            root = arm[int(rng.integers(1, len(arm)))]
            branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
            arms.append(_walk(rng, root, branch_angle, step, max(2, steps // 2)))
    for i, arm in enumerate(arms):
        draw.line(arm, fill=255, width=width if i < 2 else max(1, width - 1), joint="curve")
    alpha = np.clip(ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32) / 255, 0.5) * 1.6, 0, 1)
    base = _local_mean(ctx.img, cy, cx, size / 4)
    target = np.broadcast_to(base * rng.uniform(0.1, 0.35), ctx.img.shape)
    return alpha, target


def _spot(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-4 small soft blobs near each other, darker (70 %) or lighter than the surface."""
    cy, cx = _center(rng, ctx)
    canvas, draw = _canvas(ctx)
    spread = rng.uniform(*ctx.cfg.size_range) * ctx.side / 2
    radii = []
    for i in range(int(rng.integers(1, 5))):
        oy, ox = (0.0, 0.0) if i == 0 else rng.uniform(-spread, spread, 2)
        r = max(1.5, ctx.side * rng.uniform(0.015, 0.05))
        radii.append(r)
        draw.polygon(_blob(cy + oy, cx + ox, r, rng, jitter=0.2), fill=255)
    sigma = 0.25 * min(radii)
    alpha = np.clip(ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32) / 255, sigma) * 1.4, 0, 1)
    alpha *= rng.uniform(0.7, 0.95)
    base = _local_mean(ctx.img, cy, cx, spread)
    delta = rng.uniform(*ctx.cfg.contrast_range) * 255
    lighter = bool(rng.random() < 0.3)
    target = np.broadcast_to(_shifted(base, delta, lighter), ctx.img.shape)
    return alpha, target


_DIRT_COLOURS = np.array([[92, 70, 42], [45, 42, 40], [138, 74, 34], [70, 72, 84], [160, 150, 110]], float)


def _contamination(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A semi-transparent irregular stain of dirt / rust / oil hue with a mottled opacity, darker (70 %)
    or lighter than the surface."""
    cy, cx = _center(rng, ctx)
    r = rng.uniform(*ctx.cfg.size_range) * ctx.side / 2
    canvas, draw = _canvas(ctx)
    for i in range(int(rng.integers(1, 4))):
        oy, ox = (0.0, 0.0) if i == 0 else rng.uniform(-r / 2, r / 2, 2)
        draw.polygon(_blob(cy + oy, cx + ox, r * rng.uniform(0.5, 1.0), rng, jitter=0.45), fill=255)
    shape = np.asarray(canvas, dtype=np.float32) / 255
    mottle = 0.55 + 0.45 * _smooth_noise(rng, shape.shape, r / 5)
    alpha = np.clip(ndimage.gaussian_filter(shape, max(1.0, r / 10)) * 1.5, 0, 1) * mottle
    alpha *= rng.uniform(0.6, 0.9)
    # The stain's hue is drawn from the palette; its brightness differs from the surface by the contrast.
    hue = _DIRT_COLOURS[int(rng.integers(len(_DIRT_COLOURS)))]
    local = float(_local_mean(ctx.img, cy, cx, r).mean())
    delta = rng.uniform(*ctx.cfg.contrast_range) * 255
    level = (
        local - delta
        if (rng.random() < 0.7 and local - delta >= 15) or local + delta > 240
        else local + delta
    )
    colour = np.clip(hue * max(level, 10.0) / hue.mean(), 0, 255)
    grain = rng.normal(0, 6, (ctx.h, ctx.w, 1))
    return alpha, np.clip(colour + grain, 0, 255)


def _missing_piece(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jagged chunk broken off at an edge (the object's outline, else the image border): it shows the
    background colour (object images) or a dark gap, with a lighter fracture rim."""
    r = rng.uniform(*ctx.cfg.size_range) * ctx.side / 2
    if ctx.foreground is not None:
        edge = ctx.foreground & ~ndimage.binary_erosion(ctx.foreground)
        ys, xs = np.nonzero(edge)
        i = int(rng.integers(len(ys)))
        cy, cx = float(ys[i]), float(xs[i])
        border = np.concatenate([ctx.img[0], ctx.img[-1], ctx.img[:, 0], ctx.img[:, -1]])
        fill = np.median(border, axis=0)
    else:
        side = int(rng.integers(4))
        t = rng.uniform(0.15, 0.85)
        cy, cx = [(0.0, t * ctx.w), (ctx.h - 1.0, t * ctx.w), (t * ctx.h, 0.0), (t * ctx.h, ctx.w - 1.0)][
            side
        ]
        fill = np.full(3, min(float(np.percentile(ctx.img, 1)), 40.0) * rng.uniform(0.2, 0.6))
    n = int(rng.integers(6, 11))
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.3, 0.3, n) * np.pi / n
    radii = r * rng.uniform(0.55, 1.0, n)
    canvas, draw = _canvas(ctx)
    draw.polygon(
        [(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii, strict=True)], fill=255
    )
    region = np.asarray(canvas) > 0
    if ctx.foreground is not None:
        region &= ctx.foreground
    rim = region & ~ndimage.binary_erosion(region, iterations=max(1, ctx.side // 150))
    target = np.clip(fill + rng.normal(0, 3, (ctx.h, ctx.w, 1)), 0, 255)
    base = _local_mean(ctx.img, cy, cx, r)
    target[rim] = np.clip(base + 40, 0, 255)
    return region.astype(np.float32), target


def _texture(ctx: _Ctx, rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """Procedural texture (stripes, checker or grain) of shape (size, size, 3) around ``base``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(3.0, size * rng.uniform(0.08, 0.25))
    kind = int(rng.integers(3))
    if kind == 0:
        theta = rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    elif kind == 1:
        pattern = np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
    else:
        pattern = 2 * _smooth_noise(rng, (size, size), period / 4) - 1
    amp = rng.uniform(*ctx.cfg.contrast_range) * 255 / 2
    tint = rng.uniform(0.8, 1.2, 3)
    return np.clip(base * tint + amp * pattern[..., None], 0, 255)


def _foreign_texture(ctx: _Ctx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular patch of foreign texture: a region of the same image pasted rotated by 90 degrees
    with stronger contrast (50 %), else a procedural texture."""
    cy, cx = _center(rng, ctx)
    r = rng.uniform(*ctx.cfg.size_range) * ctx.side / 2.5
    s = max(3, int(2 * r) + 2)
    y0, x0 = int(np.clip(cy - s / 2, 0, max(0, ctx.h - s))), int(np.clip(cx - s / 2, 0, max(0, ctx.w - s)))
    ph, pw = min(s, ctx.h - y0), min(s, ctx.w - x0)
    canvas, draw = _canvas(ctx)
    draw.polygon(_blob(y0 + ph / 2, x0 + pw / 2, min(ph, pw) / 2 - 0.5, rng, jitter=0.3), fill=255)
    alpha = np.clip(ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32) / 255, 0.7) * 1.3, 0, 1)
    target = ctx.img.copy()
    base = ctx.img[y0 : y0 + ph, x0 : x0 + pw].reshape(-1, 3).mean(axis=0)
    patch = None
    if rng.random() < 0.5 and ph == pw and ctx.h >= 2 * ph and ctx.w >= 2 * pw:
        for _ in range(10):
            sy, sx = int(rng.integers(0, ctx.h - ph + 1)), int(rng.integers(0, ctx.w - pw + 1))
            if abs(sy - y0) + abs(sx - x0) >= ph:
                src = ctx.img[sy : sy + ph, sx : sx + pw]
                src = np.rot90(src, k=int(rng.choice([1, 3])))
                mean = src.reshape(-1, 3).mean(axis=0)
                patch = np.clip((src - mean) * rng.uniform(1.4, 2.0) + mean, 0, 255)
                break
    if patch is None:
        patch = _texture(ctx, rng, s, base)[:ph, :pw]
    target[y0 : y0 + ph, x0 : x0 + pw] = patch
    return alpha, target


_KINDS: dict[str, _Kind] = {
    "scratch": _scratch,
    "crack": _crack,
    "spot": _spot,
    "contamination": _contamination,
    "missing_piece": _missing_piece,
    "foreign_texture": _foreign_texture,
}


# ------------------------------------------------------------------------------------------- compose


def _compose(image: np.ndarray, alpha: np.ndarray, target: np.ndarray, cfg: SynthConfig) -> SynthDefect:
    mask = alpha > 0
    target = np.asarray(target, dtype=np.float32)
    if is_grey(image):
        target = np.repeat(target.mean(axis=2, keepdims=True), 3, axis=2)
    a = alpha[..., None]
    blended = np.clip(np.rint(image.astype(np.float32) * (1 - a) + target * a), 0, 255).astype(np.uint8)
    out = np.where(mask[..., None], blended, image)
    same = mask & (out == image).all(axis=2)
    if same.any():
        v = image[same].astype(np.int16)
        step = np.where(v.mean(axis=1, keepdims=True) < 128, cfg.nudge, -cfg.nudge)
        out[same] = np.clip(v + step, 0, 255).astype(np.uint8)
    return SynthDefect(out, mask, "")


def synthesize(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None, cfg: SynthConfig = SynthConfig()
) -> SynthDefect:
    """Place one synthetic defect of ``kind`` (None: drawn from ``cfg.kinds``) on ``image`` ((H, W, 3)
    uint8). The result's mask is non-empty and equals the set of changed pixels."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if kind is None:
        kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
    if kind not in _KINDS:
        raise ConfigError(f"unknown synthetic defect kind {kind!r} (one of {', '.join(SYNTHETIC_KINDS)})")
    img = image.astype(np.float32)
    foreground = estimate_foreground(image, cfg)
    need = min(cfg.min_pixels, max(1, image.shape[0] * image.shape[1] // 16))
    for attempt in range(cfg.max_tries + 1):
        # Last try: the whole image is the surface (a foreground too thin for the drawn shape).
        fg = foreground if attempt < cfg.max_tries else None
        alpha, target = _KINDS[kind](_Ctx(img, fg, cfg), rng)
        if fg is not None:
            alpha = alpha * fg
        alpha = np.where(alpha >= cfg.alpha_floor, alpha, 0.0).astype(np.float32)
        if int((alpha > 0).sum()) >= need:
            break
    else:
        raise ValueError(f"could not place a {kind} defect on a {image.shape[1]}x{image.shape[0]} image")
    defect = _compose(image, alpha, target, cfg)
    return SynthDefect(defect.image, defect.mask, kind)


def synthesize_kinds(
    image: np.ndarray, rng: np.random.Generator, kinds: Sequence[str], cfg: SynthConfig = SynthConfig()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint ``kinds`` one after the other (:func:`synthesize`): the image and one bool mask per kind, each
    less the pixels a later kind painted over (so the masks are disjoint)."""
    masks: list[np.ndarray] = []
    for kind in kinds:
        painted = synthesize(image, rng, kind, cfg)
        image, new = painted.image, np.asarray(painted.mask, dtype=bool)
        masks = [m & ~new for m in masks] + [new]
    return image, masks
