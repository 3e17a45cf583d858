"""Overlays and PNG output for detections (numpy + Pillow only, no matplotlib).

``overlay`` blends a jet-like heat map of the probability map over the image and draws the binary mask's
contour on top (OURS: uniform alpha blend, white contour inside the mask's border, contour width
``max(1, round(max(H, W) / 300))`` pixels unless given). ``save_png`` writes atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vmad.atomic import atomic_path

CONTOUR_COLOR: tuple[int, int, int] = (255, 255, 255)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped, NaN -> 0) to jet-like RGB uint8: 0 dark blue, 0.5 light green, 1 dark
    red (piecewise-linear channels r = 1.5 - |4v - 3|, g = 1.5 - |4v - 2|, b = 1.5 - |4v - 1|)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0).clip(0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """Union of ``mask`` shifted by one pixel in the 4 directions (4-neighbour dilation)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def mask_contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (outside the image counts as background,
    so regions touching the image edge are closed)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    edge = m & ~interior
    for _ in range(max(0, width - 1)):
        edge = _shift_or(edge) & m
    return edge


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return arr


def overlay(
    image: np.ndarray,
    probability_map: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    contour_color: tuple[int, int, int] = CONTOUR_COLOR,
    contour_width: int | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8: ``(1 - alpha) * image + alpha * heat(probability_map)``, then the contour of
    ``mask`` in ``contour_color``. ``image``: (H, W[, 3|4]) uint8 or float in [0, 1]; the map and mask must
    have the image's (H, W)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _rgb_uint8(image)
    pmap = np.asarray(probability_map)
    if pmap.shape != rgb.shape[:2]:
        raise ValueError(f"probability map {pmap.shape} does not match the image {rgb.shape[:2]}")
    heat = heat_colors(pmap).astype(np.float32)
    out = np.rint((1.0 - alpha) * rgb.astype(np.float32) + alpha * heat).clip(0, 255).astype(np.uint8)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != rgb.shape[:2]:
            raise ValueError(f"mask {m.shape} does not match the image {rgb.shape[:2]}")
        width = contour_width if contour_width is not None else max(1, round(max(m.shape) / 300))
        out[mask_contour(m, width)] = np.asarray(contour_color, dtype=np.uint8)
    return out


def mask_image(mask: np.ndarray) -> np.ndarray:
    """A bool mask as an (H, W) uint8 image: 255 = defect, 0 = background."""
    return np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` ((H, W) bool -> 0/255, (H, W) or (H, W, 3|4) uint8) as PNG atomically
    (:func:`vmad.atomic.atomic_path`: a temporary file in the same folder, then ``os.replace``; not
    fsync'ed). Parent folders are created."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = mask_image(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png needs a bool or uint8 (H, W[, 3|4]) array, got {arr.dtype} {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp, open(tmp, "xb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")
    return path
