"""Inference: :class:`Detector` (detect, chat, calibrate; ``Detector.from_baseline`` for MuSc), the
``vmad eval --model`` scorer, threshold files, overlays and PNG output."""

from vmad.infer.calibration import Calibration
from vmad.infer.detector import (
    ChatTurn,
    Detection,
    Detector,
    DetectorConfig,
    VMADScorer,
    build_scorer,
)
from vmad.infer.render import heat_colors, mask_contour, overlay, save_png
from vmad.model.weights_io import packaged_weights_dir, resolve_model_path

__all__ = [
    "Calibration",
    "ChatTurn",
    "Detection",
    "Detector",
    "DetectorConfig",
    "VMADScorer",
    "build_scorer",
    "heat_colors",
    "mask_contour",
    "overlay",
    "packaged_weights_dir",
    "resolve_model_path",
    "save_png",
]
