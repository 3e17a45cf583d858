"""Training-free baselines behind the prediction API: :class:`BaselineDetector` (MuSc) gives the same
:class:`~vmad.infer.detection.Detection` objects as :class:`~vmad.infer.detector.Detector` (score, anomaly
map, binary mask, verdict), and the same ``calibrate`` / ``load_threshold_file``. Get one with
``Detector.from_baseline("musc")``; ``vmad detect --baseline musc`` uses it.

Two modes (OURS, :mod:`vmad.baselines.musc`):

- **zero-shot** (no references, MuSc as published): the images of one :meth:`BaselineDetector.detect` call
  are scored against each other (mutual scoring, then RsCIN in the score's own units), so a call needs at
  least 2 images and a result depends on the other images of the call: give all images of one object at
  once (``vmad detect --baseline musc FOLDER`` does);
- **reference mode** (at least 2 normal images of the object as references, from ``references=``,
  :meth:`calibrate` or a threshold file): each image is scored against the references only, so one image at a
  time works and a result does not depend on the other images.

Mask threshold (the mask is ``map > t``): the calibrated one (the image threshold: the image score is the
map's maximum); else, in reference mode, the highest leave-one-out score of the references (no normal
reference reaches above it); else, zero-shot, the batch's median image score (MuSc's premise: most images of
a batch are normal). A verdict needs an image threshold (calibration, or ``image_threshold=``).
Maps: MuSc's map (``image_size`` square, images stretched to it) resized bilinearly to each image's
processed size; ``Detection.map_kind`` is ``"distance"`` (patch-feature distances, not probabilities).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vmad.config import from_mapping
from vmad.errors import ConfigError, VMADError
from vmad.infer.calibration import DEFAULT_FPR, Calibration, make_calibration
from vmad.infer.detection import Detection, ImageInput, _is_single, _load, make_detection

# MuSc settings that change its scores: a calibration is valid only for the same values.
SCORE_SETTINGS = ("image_size", "block_indices", "grid_stride", "degrees", "topmin_min", "topmin_max",
                  "rscin_k")
DETECTOR_OPTIONS = ("mask_threshold", "image_threshold", "max_pixels")


@dataclass
class BaselineDetectorConfig:
    """Inference settings of a baseline detector (OURS). ``mask_threshold`` / ``image_threshold``: None = by
    the module rules (no verdict without an image threshold); ``max_pixels``: images with more pixels are
    reduced first, as :class:`~vmad.infer.detector.DetectorConfig` does."""

    mask_threshold: float | None = None
    image_threshold: float | None = None
    max_pixels: int = 4_194_304

    def validate(self) -> BaselineDetectorConfig:
        for name in ("mask_threshold", "image_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number or None, got {value}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        return self


def _resize(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> ``size`` (h, w), bilinear (align_corners False), float32."""
    if tuple(amap.shape) == tuple(size):
        return amap.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


class BaselineDetector:
    """MuSc behind the :class:`~vmad.infer.detector.Detector` API (see the module docstring)."""

    def __init__(self, scorer: Any, config: BaselineDetectorConfig | None = None, name: str = "musc") -> None:
        self.scorer = scorer
        self.config = (config or BaselineDetectorConfig()).validate()
        self.name = name
        self.calibration: Calibration | None = None
        self.reference_sources: list[str | None] = []
        self._ref_levels: list[torch.Tensor] | None = None
        self._ref_scores: np.ndarray | None = None

    # ------------------------------------------------------------- references
    @property
    def has_references(self) -> bool:
        return self._ref_levels is not None

    def _pixels(self, image: ImageInput) -> tuple[np.ndarray, str | None, tuple[int, int]]:
        """(uint8 (h, w, 3) at most max_pixels, source, input (H, W)), checked as ``Detector.detect``."""
        t, source, size = _load(image, self.config.max_pixels)
        arr = (t.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        return arr, source, size

    def set_references(self, images: Sequence[ImageInput]) -> None:
        """Use these normal images (at least 2) as references: reference mode from now on."""
        items = list(images)
        if len(items) < 2:
            raise VMADError(f"{self.name} reference mode needs at least 2 normal reference images, got "
                            f"{len(items)}")
        loaded = [self._pixels(x) for x in items]
        levels = self.scorer.reference_levels([a for a, _, _ in loaded])
        self._ref_scores = self.scorer.leave_one_out_scores(levels)
        self._ref_levels = levels
        self.reference_sources = [s for _, s, _ in loaded]

    def clear_references(self) -> None:
        """Back to zero-shot mode (thresholds kept)."""
        self._ref_levels, self._ref_scores, self.reference_sources = None, None, []

    # ------------------------------------------------------------- detect
    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        question: str | None = None,
        answer: bool = False,
        class_name: str | None = None,
        *,
        max_new_tokens: int | None = None,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[Detection]:
        """Score, map, mask and verdict per image, as ``Detector.detect`` (same inputs and checks; no
        question, no answers: VMADError when asked for them). ``class_name`` is not used by MuSc."""
        if answer:
            raise VMADError(f"{self.name} gives no text answers; ask for segmentation only (answer=False, "
                            "vmad detect --no-answer)")
        if question is not None:
            raise VMADError(f"{self.name} takes no question (leave it out)")
        items = [images] if _is_single(images) else list(images)  # type: ignore[arg-type]
        if not items:
            return []
        loaded = [self._pixels(x) for x in items]
        if original_sizes is not None:
            if len(original_sizes) != len(loaded):
                raise VMADError(f"original_sizes has {len(original_sizes)} entries for {len(loaded)} images")
            loaded = [(a, s, tuple(o) if o is not None else hw)
                      for (a, s, hw), o in zip(loaded, original_sizes, strict=True)]
        if self._ref_levels is None and len(loaded) < 2:
            raise VMADError(
                f"{self.name} scores images against each other: give at least 2 images (a folder), or normal "
                "reference images (references=..., vmad detect --reference DIR, or a threshold file from "
                f"`vmad calibrate --baseline {self.name}`)"
            )
        maps, scores = self.scorer.maps([a for a, _, _ in loaded], self._ref_levels)
        mask_t = self.mask_threshold(scores)
        out = []
        for (arr, source, size), amap, score in zip(loaded, maps, scores, strict=True):
            m = _resize(amap, arr.shape[:2])
            out.append(make_detection(m, float(score), "", size, mask_t, self.config.image_threshold,
                                      source=source, mask_from=self.name, map_kind="distance"))
        return out

    def mask_threshold(self, batch_scores: np.ndarray) -> float:
        """The mask threshold for a batch with these image scores (module rules)."""
        if self.config.mask_threshold is not None:
            return float(self.config.mask_threshold)
        if self._ref_scores is not None:
            return float(np.max(self._ref_scores))
        return float(np.median(batch_scores))

    # ------------------------------------------------------------- thresholds
    def method_info(self) -> dict[str, Any]:
        """What a calibration is valid for: the baseline and its score-changing settings."""
        settings = {k: v for k, v in asdict(self.scorer.config).items() if k in SCORE_SETTINGS}
        return {"kind": self.name, "settings": json.loads(json.dumps(settings))}

    def calibrate(
        self,
        normal_images: Sequence[ImageInput],
        class_name: str | None = None,
        fpr: float = DEFAULT_FPR,
        answer: bool = False,
        apply: bool = True,
    ) -> Calibration:
        """Use the normal images (at least 2) as references and derive the verdict threshold from their
        leave-one-out scores (the rule of :mod:`vmad.infer.calibration`); ``apply`` sets it (image and mask
        thresholds). The references' paths go into the calibration (arrays cannot be saved)."""
        if answer:
            raise VMADError(f"{self.name} gives no text answers; calibrate without answer mode")
        items = [normal_images] if _is_single(normal_images) else list(normal_images)  # type: ignore[arg-type]
        self.set_references(items)
        sources = list(self.reference_sources)
        references = [str(Path(s).resolve()) for s in sources if s is not None]
        cal = make_calibration(
            [float(s) for s in self._ref_scores],  # type: ignore[union-attr]
            self.method_info(),
            fpr,
            mask_range=None,
            images=[s or f"<array {i}>" for i, s in enumerate(sources)],
            references=references if len(references) == len(sources) else [],
            class_name=class_name,
        )
        if apply:
            self.apply_calibration(cal, use_references=False)
        return cal

    def apply_calibration(self, calibration: Calibration, where: str = "calibration",
                          use_references: bool = True) -> None:
        """Use ``calibration``'s thresholds and (``use_references``) its reference images (read again from
        their paths); VMADError when it was made for another method or settings, or a reference is gone."""
        calibration.check_method(self.method_info(), where)
        if use_references and not calibration.references:
            raise VMADError(f"{where}: no reference images recorded (calibrated from in-memory arrays); "
                            "calibrate from image files")
        if use_references:
            missing = [p for p in calibration.references if not Path(p).is_file()]
            if missing:
                raise VMADError(f"{where}: reference image {missing[0]} is gone ({len(missing)} missing); "
                                f"calibrate again")
            self.set_references(calibration.references)
        self.config = replace(self.config, image_threshold=float(calibration.image_threshold),
                              mask_threshold=float(calibration.mask_threshold)).validate()
        self.calibration = calibration

    def load_threshold_file(self, path: str | Path) -> Calibration:
        """Read a ``vmad calibrate --baseline`` file and apply it (thresholds and references)."""
        calibration = Calibration.load(path)
        self.apply_calibration(calibration, str(path))
        return calibration


def build_baseline_detector(
    name: str = "musc",
    references: Sequence[ImageInput] | None = None,
    threshold_file: str | Path | None = None,
    **options: Any,
) -> BaselineDetector:
    """The detector of baseline ``name``: ``options`` are :class:`BaselineDetectorConfig` fields
    (``mask_threshold``, ``image_threshold``, ``max_pixels``) or the baseline's config fields."""
    from vmad.baselines import build_baseline

    det_options = {k: options.pop(k) for k in DETECTOR_OPTIONS if k in options}
    scorer = build_baseline(name, **options)
    config = from_mapping(BaselineDetectorConfig, det_options, "detector")
    detector = BaselineDetector(scorer, config, name=scorer.name)
    if references:
        detector.set_references(references)
    if threshold_file is not None:
        detector.load_threshold_file(threshold_file)
    return detector
