"""Training-free baselines evaluated side by side with VMAD, by name (``vmad eval --baseline NAME``)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from vmad.errors import ConfigError, VMADError
from vmad.eval.scorer import Scorer

BASELINES: tuple[str, ...] = ("musc",)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """A CLI string ("320", "0.3", "1,3,5", "true") -> the field's type; non-strings pass through."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        (inner, *_rest) = typing.get_args(kind) or (str,)
        return tuple(_convert(v.strip() if isinstance(v, str) else v, inner, key) for v in items if v != "")
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            low = value.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return low in ("1", "true", "yes")
        if kind in (int, float):
            return kind(value)
    except ValueError as exc:
        raise ConfigError(f"option {key}={value!r}: expected {kind.__name__}") from exc
    return value


def config_from_options(cls: type, options: dict[str, Any]) -> Any:
    """Build the dataclass ``cls`` from keyword options, converting strings to the declared field types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    return cls(**{k: _convert(v, hints[k], k) for k, v in options.items()})


def build_baseline(name: str, **options: Any) -> Scorer:
    """The scorer called ``name`` with its config fields set from ``options`` (strings are converted)."""
    key = name.strip().lower()
    if key == "musc":
        from vmad.baselines.musc import MuScConfig, MuScScorer

        return MuScScorer(config_from_options(MuScConfig, options))
    raise VMADError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
