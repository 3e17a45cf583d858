"""The interface every evaluated method implements: images of one class in, scores and maps out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class ScoreOutput:
    """``image_scores``: (N,) float, higher = more anomalous. ``anomaly_maps``: (N, h, w) float32 at any
    resolution (the engine resizes them to the mask resolution)."""

    image_scores: np.ndarray
    anomaly_maps: np.ndarray


@runtime_checkable
class Scorer(Protocol):
    """A zero-shot scorer. It sees all test images of one class at once (MuSc needs that; per-image
    methods just loop). Images are (H, W, 3) uint8 RGB arrays of possibly different sizes.

    Optional attribute ``images_per_call: int``: the scorer scores images independently of each other and
    wants this many per call (e.g. its batch size); the evaluation engine then calls ``score`` on
    consecutive chunks of the class (the last one shorter) while the next images are being decoded."""

    name: str

    def score(self, images: Sequence[np.ndarray], class_name: str) -> ScoreOutput: ...

    def settings(self) -> dict: ...
