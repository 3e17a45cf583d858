"""Mask and overlay images of one detection, shared by ``vmad chat`` and the web page (``vmad serve``).

Files follow ``vmad detect``'s rules (:mod:`vmad.cli.detect`): the mask PNG (0/255) and the overlay PNG are
written at the image's own size, atomically; for an image the detector processed downscaled they are
written strip by strip from the reduced maps. Previews (what the page and the chat show) are at the size the
model saw, so a very large upload never becomes a very large picture in the browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vmad.cli.detect import _mask_strips, _upsampled_strips, write_png_strips
from vmad.infer.render import mask_image, overlay, save_png

if TYPE_CHECKING:
    from vmad.infer.detector import Detection


def preview_overlay(image: np.ndarray, detection: Detection, alpha: float = 0.5) -> np.ndarray:
    """(h, w, 3) uint8 heat-map overlay with the mask contour, at the size the model saw; ``image`` is the
    pixels given to the detector (reduced for a downscaled image)."""
    mask = detection.processed_mask if detection.downscaled else detection.mask
    return overlay(image, detection.probability_map, mask, alpha)


def preview_mask(detection: Detection) -> np.ndarray:
    """(h, w) uint8 0/255 mask at the size the model saw."""
    return mask_image(detection.processed_mask if detection.downscaled else detection.mask)


def save_detection_images(
    image: np.ndarray,
    detection: Detection,
    mask_path: Path,
    overlay_path: Path,
    alpha: float = 0.5,
    preview: np.ndarray | None = None,
) -> None:
    """Write the mask and the overlay at the image's own size (``preview``: :func:`preview_overlay`'s
    result when the caller has it already)."""
    small = preview if preview is not None else preview_overlay(image, detection, alpha)
    if detection.downscaled:
        write_png_strips(mask_path, _mask_strips(detection.mask))
        write_png_strips(overlay_path, _upsampled_strips(small, detection.size))
    else:
        save_png(mask_path, detection.mask)
        save_png(overlay_path, small)
