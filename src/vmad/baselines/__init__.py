"""Training-free baselines evaluated side by side with VMAD, by name (``vmad eval --baseline NAME``)."""

from __future__ import annotations

from typing import Any

from vmad.config import from_mapping
from vmad.errors import VMADError
from vmad.eval.scorer import Scorer

BASELINES: tuple[str, ...] = ("musc",)


def build_baseline(name: str, **options: Any) -> Scorer:
    """The scorer called ``name`` with its config fields set from ``options`` (strings are converted by
    :func:`vmad.config.from_mapping`)."""
    key = name.strip().lower()
    if key == "musc":
        from vmad.baselines.musc import MuScConfig, MuScScorer

        return MuScScorer(from_mapping(MuScConfig, options, "musc"))
    raise VMADError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
