"""Evaluation: exact metrics, the engine behind ``vmad eval`` and Table I style tables."""

from __future__ import annotations

from typing import Any

from vmad.eval.metrics import (
    UndefinedMetricWarning,
    aupro,
    aupro_200,
    f1_max,
    image_ap,
    image_auroc,
    image_metrics,
    pixel_ap,
    pixel_auroc,
    pixel_metrics,
)
from vmad.eval.scorer import ScoreOutput, Scorer

__all__ = [
    "EvalResult",
    "EvalSettings",
    "ScoreOutput",
    "Scorer",
    "UndefinedMetricWarning",
    "aupro",
    "aupro_200",
    "evaluate",
    "f1_max",
    "image_ap",
    "image_auroc",
    "image_metrics",
    "pixel_ap",
    "pixel_auroc",
    "pixel_metrics",
]

_ENGINE = ("EvalResult", "EvalSettings", "evaluate")


def __getattr__(name: str) -> Any:  # the engine pulls in the data layer; import it only when asked for
    if name in _ENGINE:
        from vmad.eval import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'vmad.eval' has no attribute {name!r}")
