"""One image's result (:class:`Detection`), shared by every method of the prediction API (VMAD models and
baselines), the verdict rule, and the image-input helpers (checking, loading, the large-image guard).

Verdict (OURS): with an image threshold t (``DetectorConfig.image_threshold``, a threshold file from
``vmad calibrate`` / :meth:`Detector.calibrate`), an image is ``"anomalous"`` when its anomaly score is
``> t``, else ``"normal"``; without one the verdict is None (no threshold, no verdict). The binary mask is
``map > mask_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vmad.data.io import read_image, read_image_bounded, reduce_image, reduction_factor, to_rgb_array
from vmad.data.text import describe_location, describe_size, mask_facts, number_word
from vmad.errors import VMADError

ImageInput = str | Path | np.ndarray | Image.Image | torch.Tensor
ANOMALOUS, NORMAL = "anomalous", "normal"


def verdict_of(score: float, image_threshold: float | None) -> str | None:
    """``"anomalous"`` when ``score > image_threshold``, ``"normal"`` otherwise; None without a threshold."""
    if image_threshold is None:
        return None
    return ANOMALOUS if score > image_threshold else NORMAL


@dataclass
class Detection:
    """One image's result, whatever the method. ``mask`` (H, W) bool is at the input image's size;
    ``probability_map`` float32 is at the input size too, except for an image above
    ``DetectorConfig.max_pixels``, which was reduced before the model ran: then ``processed_size`` is the
    reduced (h, w), ``probability_map`` is (h, w) (use :meth:`full_probability_map` for the input size) and
    ``processed_mask`` is its thresholded (h, w) mask; ``processed_size`` is None otherwise. ``answer`` is
    the generated text (None in segmentation-only mode and for baselines); ``source`` the image file (None
    for arrays); ``mask_from``: ``"segment"``, ``"answer"`` (see :mod:`vmad.infer.detector`) or the
    baseline's name. With a mask refiner (OURS, ``mask_decoder.refiner``, on unless
    ``DetectorConfig.refine`` is False) ``mask`` is thresholded on the refined logits, while
    ``probability_map``, ``logit_map`` and the score stay the decoder's (the maps ``vmad eval`` ranks).

    ``map_kind``: ``"probability"`` (VMAD: sigmoid of the mask logits, in [0, 1]) or ``"distance"`` (MuSc:
    patch-feature distances, the score's own units; ``probability_map`` then holds that anomaly map).
    ``mask_threshold``: the mask is ``map > mask_threshold``. ``image_threshold``: the verdict threshold
    (None: no verdict); ``verdict``: ``"anomalous"`` / ``"normal"`` / None (module rule). ``prior``: for a
    model that takes a normality prior (OURS), where the image's came from (``folder``, ``references``,
    ``folder+references``) or ``none``; None for other models. ``logit_map`` / ``score_logit`` (OURS, models
    with ``model.score.space`` ``logit``, segmentation path): the mask logits beside ``probability_map`` (same
    size) and the image score's log-odds, which keep their order where probabilities saturate at 1."""

    anomaly_score: float
    mask: np.ndarray
    probability_map: np.ndarray
    answer: str | None = None
    source: str | None = None
    question: str = ""
    mask_from: str = "segment"
    processed_size: tuple[int, int] | None = None
    processed_mask: np.ndarray | None = field(default=None, repr=False)
    mask_threshold: float = 0.5
    image_threshold: float | None = None
    verdict: str | None = None
    map_kind: str = "probability"
    prior: str | None = None
    logit_map: np.ndarray | None = field(default=None, repr=False)
    score_logit: float | None = None

    @property
    def anomaly_map(self) -> np.ndarray:
        """The map the mask is thresholded from (``probability_map``; named for baselines, whose maps are
        no probabilities)."""
        return self.probability_map

    def heat_map(self) -> np.ndarray:
        """The map scaled to [0, 1] for display: probabilities as they are; other maps divided by twice the
        mask threshold (the mask's edge at mid-scale), clipped."""
        if self.map_kind == "probability":
            return self.probability_map
        scale = 2.0 * self.mask_threshold if self.mask_threshold > 0 else 1.0
        return np.clip(self.probability_map / scale, 0.0, 1.0).astype(np.float32)

    @property
    def downscaled(self) -> bool:
        """True when the image was reduced before the model ran (see the class docstring)."""
        return self.processed_size is not None

    def full_probability_map(self) -> np.ndarray:
        """``probability_map`` at the input size (bilinear upsampling for a downscaled image; else the map
        itself)."""
        if not self.downscaled:
            return self.probability_map
        return _upsample(self.probability_map, self.size)

    def full_logit_map(self) -> np.ndarray | None:
        """``logit_map`` at the input size (bilinear, as :meth:`full_probability_map`), or None."""
        if self.logit_map is None or not self.downscaled:
            return self.logit_map
        return _upsample(self.logit_map, self.size)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def mask_description(self) -> str:
        """What the predicted mask shows, computed from the mask alone (not the LLM's words): regions
        (8-connected), where on a 3x3 grid, and their extent."""
        facts = self._facts()
        if facts is None:
            return "The mask is empty: no pixel is above the threshold."
        regions = "one region" if facts.count == 1 else f"{number_word(facts.count)} regions"
        return f"The mask marks {regions} at {describe_location(facts)} ({describe_size(facts)})."

    def _facts(self) -> Any:
        """Mask facts; for a downscaled image from the reduced mask (cheap), area and box scaled to the
        input size."""
        if self.processed_mask is None:
            return mask_facts(self.mask)
        facts = mask_facts(self.processed_mask)
        if facts is None:
            return None
        (h, w), (height, width) = self.processed_mask.shape, self.size
        sy, sx = height / h, width / w
        box = (round(facts.box[0] * sx), round(facts.box[1] * sy))
        return replace(facts, area=int(self.mask.sum()), box=box)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (no arrays); ``processed_size`` is [h, w] for a downscaled image, else None."""
        return {
            "source": self.source,
            "score": float(self.anomaly_score),
            "height": int(self.mask.shape[0]),
            "width": int(self.mask.shape[1]),
            "mask_pixels": int(self.mask.sum()),
            "mask_from": self.mask_from,
            "question": self.question,
            "answer": self.answer,
            "mask_description": self.mask_description,
            "downscaled": self.downscaled,
            "processed_size": list(self.processed_size) if self.processed_size else None,
            "verdict": self.verdict,
            "image_threshold": self.image_threshold,
            "mask_threshold": self.mask_threshold,
            "map_kind": self.map_kind,
            "prior": self.prior,
            "score_logit": self.score_logit,
        }


def make_detection(
    probs: np.ndarray,
    score: float,
    question: str,
    size: tuple[int, int] | None,
    mask_threshold: float,
    image_threshold: float | None,
    mask_logits: np.ndarray | None = None,
    **kw: Any,
) -> Detection:
    """A :class:`Detection` from a float32 map at the processed size: the mask ``probs > mask_threshold``
    at ``size`` (upsampled strip by strip when ``size`` differs from the map's; None = the map's size), the
    verdict from ``image_threshold``. ``mask_logits`` (OURS, a model with a mask refiner): the binary mask
    is ``mask_logits > 0`` instead (same size; the refiner's logits with ``mask_threshold`` already applied),
    the map staying ``probs``."""
    p = np.asarray(probs, dtype=np.float32)
    source, cut = (p, mask_threshold) if mask_logits is None else (np.asarray(mask_logits, np.float32), 0.0)
    mask = source > cut
    common = dict(question=question, mask_threshold=float(mask_threshold), image_threshold=image_threshold,
                  verdict=verdict_of(float(score), image_threshold), **kw)
    if size is None or tuple(size) == p.shape:
        return Detection(float(score), mask, p, **common)
    full = _upsample(source, size, cut)
    return Detection(float(score), full, p, processed_size=p.shape, processed_mask=mask,  # type: ignore[arg-type]
                     **common)


# ------------------------------------------------------------------------------------------ images


def _unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    """Pixel values -> float32 in [0, 1], checked (VMADError otherwise): uint8 is 0-255; other integer dtypes
    are taken as 0-255 too, but only when every value is in [0, 255]; floating point must be finite and in
    [0, 1] (it is never rescaled or clipped); bool and complex are refused."""
    if t.dtype == torch.bool or t.is_complex():
        raise VMADError(f"image {what} of dtype {t.dtype} is not an image; give uint8 0-255 or float 0-1")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        lo, hi = int(t.long().min()), int(t.long().max())
        if lo < 0 or hi > 255:
            raise VMADError(
                f"image {what} of dtype {t.dtype} has values in [{lo}, {hi}]; integer images must be 0-255"
            )
        return t.float() / 255.0
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise VMADError(
            f"image {what} has {n_nan} NaN and {n_inf} infinite value(s); pixels must be finite, in [0, 1]"
        )
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise VMADError(
            f"float image {what} has values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
            "(divide 0-255 data by 255, or give uint8)"
        )
    return t


_STRIP_ROWS = 512


def _upsample(probs: np.ndarray, size: tuple[int, int], threshold: float | None = None) -> np.ndarray:
    """(h, w) float32 probabilities bilinearly upsampled to ``size`` (H, W) (PIL, strip by strip, each strip
    the matching rows of one full resize); with ``threshold``, the (H, W) bool ``> threshold`` instead, so
    no full-size float map is ever held."""
    height, width = size
    h, w = probs.shape
    im = Image.fromarray(np.ascontiguousarray(probs, dtype=np.float32))
    out = np.empty((height, width), dtype=np.float32 if threshold is None else bool)
    sy = h / height
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        strip = np.asarray(
            im.resize((width, y1 - y0), Image.Resampling.BILINEAR, box=(0.0, y0 * sy, float(w), y1 * sy))
        )
        out[y0:y1] = strip if threshold is None else strip > threshold
    return out


def _reduce_tensor(t: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """[3, H, W] float reduced below ``max_pixels`` (area average); ``t`` itself at or below the limit."""
    height, width = t.shape[-2:]
    factor = reduction_factor(height, width, max_pixels)
    if factor == 1:
        return t
    size = (-(-height // factor), -(-width // factor))
    return torch.nn.functional.interpolate(t[None].float(), size=size, mode="area")[0]


def _load(image: ImageInput, max_pixels: int | None) -> tuple[torch.Tensor, str | None, tuple[int, int]]:
    """:func:`_as_tensor` with the large-image guard: ``(tensor at most max_pixels, source, input (H, W))``.
    Files are decoded at a bounded size; PIL images and uint8 arrays are reduced before conversion to float;
    other inputs after."""
    if isinstance(image, (str, Path)):
        arr, size = read_image_bounded(image, max_pixels)
        t, _ = _as_tensor(arr)
        return t, str(image), size
    if max_pixels is None:
        t, source = _as_tensor(image)
        return t, source, tuple(t.shape[-2:])  # type: ignore[return-value]
    if isinstance(image, Image.Image):
        size = (image.height, image.width)
        t, source = _as_tensor(reduce_image(image, max_pixels))
        return t, source, size
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        size = (int(image.shape[0]), int(image.shape[1]))
        if reduction_factor(*size, max_pixels) > 1 and (image.ndim == 2 or image.shape[2] in (1, 3, 4)):
            arr = image[:, :, :3] if image.ndim == 3 and image.shape[2] >= 3 else image.reshape(size)
            t, source = _as_tensor(np.array(reduce_image(Image.fromarray(np.ascontiguousarray(arr)),
                                                         max_pixels)))
            return t, source, size
    t, source = _as_tensor(image)
    size = tuple(t.shape[-2:])
    return _reduce_tensor(t, max_pixels), source, size  # type: ignore[return-value]


def _as_tensor(image: ImageInput) -> tuple[torch.Tensor, str | None]:
    """Any accepted input -> ``([3, H, W] float in [0, 1], source path or None)``.

    Paths are read with :func:`vmad.data.read_image`; arrays are (H, W, 3|4) or (H, W), tensors ``[3, H, W]``
    or ``[1, H, W]`` / ``[H, W]``. Pixel values (arrays and tensors alike) are checked, never clipped:
    uint8 is 0-255; other integer dtypes (int64, uint16, ...) are accepted as 0-255 only when every value is
    in [0, 255], else VMADError; float must be finite (no NaN / inf) and in [0, 1], else VMADError naming
    the range found."""
    source = None
    if isinstance(image, (str, Path)):
        source = str(image)
        image = read_image(image)
    elif isinstance(image, Image.Image):
        image = to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 1:
            raise VMADError(f"image tensor must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
        return _unit_range(t, "tensor").expand(3, -1, -1), source
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise VMADError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = arr[:, :, :3] if arr.shape[2] >= 3 else np.repeat(arr, 3, axis=2)
    if arr.dtype.kind not in "biufc":
        raise VMADError(f"image array of dtype {arr.dtype} is not an image; give uint8 0-255 or float 0-1")
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:  # checked here: torch lacks min/max for uint16+
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise VMADError(
                f"image array of dtype {arr.dtype} has values in [{lo}, {hi}]; integer images must be 0-255"
            )
        arr = arr.astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return _unit_range(t, "array"), source


def _check_question(question: str | None) -> None:
    if question is not None and not question.strip():
        raise VMADError("the question must not be empty (None asks the default question)")


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, Path, Image.Image)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3


