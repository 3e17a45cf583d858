"""What every config dataclass shares: strict construction from a mapping (an unknown key is an error)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from vmad.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """``cls(**data)`` after checking that every key names a field of ``cls``; ``where`` names the config
    section in the error (e.g. ``"model.projector"``)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {where} keys: {unknown} (valid: {sorted(known)})")
    return cls(**dict(data))
