"""The one config mechanism: typed dataclasses built from mappings (YAML, JSON, command-line strings).

:func:`from_mapping` builds a dataclass recursively (a nested dataclass field from its sub-mapping), coerces
values to the declared types (a command-line string such as ``"320"``, ``"0.3"``, ``"true"``, ``"null"`` or
``"1,3,5"`` becomes the field's int, float, bool, None or tuple), checks ``Literal[...]`` values and rejects
unknown keys, all as :class:`~vmad.errors.ConfigError`. :func:`to_dict`, :func:`merge`,
:func:`parse_override` and :func:`apply_overrides` (``--set a.b=value``) complete it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from vmad.errors import ConfigError

T = TypeVar("T")

NULL_WORDS = ("null", "none", "~")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` is the section's dotted path (``""`` = top level).

    Nested dataclass fields are built from sub-mappings (None = all defaults), values are coerced to the field
    types, and an unknown key raises ``unknown <where> keys: [...] (valid: [...])``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    valid = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        raise ConfigError(f"unknown {where or 'top-level'} keys: {unknown} (valid: {valid})")
    hints = field_types(cls)
    return cls(**{key: coerce(hints[key], value, _join(where, key)) for key, value in data.items()})


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (``dataclasses.asdict``)."""
    return dataclasses.asdict(config)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: mappings are merged key by key, any other value replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_choices(config: Any, where: str) -> None:
    """Raise :class:`ConfigError` when a ``Literal``-typed field of ``config`` holds a value outside it."""
    for name, hint in field_types(type(config)).items():
        value = getattr(config, name)
        if value is None and _is_optional(hint):
            continue
        for option in _options(hint):
            if typing.get_origin(option) is Literal:
                _choice(option, value, _join(where, name))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` (a dataclass, Optional / union, bool, int, float, str, Literal, tuple,
    list, dict or Any); strings from the command line are converted. ``key`` names it in errors."""
    options = _options(hint)
    if _is_optional(hint) and (value is None or _is_null_word(value)):
        return None
    if value is None:
        if hint is Any:
            return None
        if not any(dataclasses.is_dataclass(option) for option in options):
            raise ConfigError(f"{key} may not be null")
        value = {}  # an empty YAML section: all defaults
    expected = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce_one(option, value, key)
        except _Mismatch as exc:
            expected.append(str(exc))
    raise ConfigError(f"{key} must be {' or '.join(expected)}, got {value!r}")


class _Mismatch(Exception):
    """``value`` is not of this option of a union (its message says what was expected)."""


def _coerce_one(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_mapping(hint, value, key)  # type: ignore[arg-type]
        raise _Mismatch("a mapping")
    if origin is Literal:
        try:
            return _choice(hint, value, key)
        except ConfigError:
            raise _Mismatch(f"one of {list(typing.get_args(hint))}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise _Mismatch("true or false")
    if hint in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if hint is float:
                return float(value)
            if isinstance(value, int):
                return value
        if isinstance(value, str):  # a command-line string; also YAML 1.1, which reads "1e-6" as a string
            try:
                return hint(value.strip())
            except ValueError:
                pass
        raise _Mismatch("an integer" if hint is int else "a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("a string")
    if origin in (list, tuple):
        items = _items(value, key)
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Mismatch(f"{len(args)} values")
            pairs = enumerate(zip(args, items, strict=True))
            return tuple(coerce(item_hint, v, f"{key}[{i}]") for i, (item_hint, v) in pairs)
        item_hint = args[0] if args else Any
        converted = [coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = _parse_yaml(value, key)
        if not isinstance(value, Mapping):
            raise _Mismatch("a mapping")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {coerce(key_hint, k, key): coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(hint.__name__)
    return value


def _choice(hint: Any, value: Any, key: str) -> Any:
    allowed = typing.get_args(hint)
    for choice in allowed:
        if value == choice and type(value) is type(choice):
            return choice
        if isinstance(value, str) and not isinstance(choice, str) and value.strip() == str(choice):
            return choice
    raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _items(value: Any, key: str) -> list[Any]:
    """A list's items: a sequence as is; a string as YAML when it starts with ``[``, else split at commas."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _parse_yaml(text, key)
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise _Mismatch("a list")


def _parse_yaml(text: str, key: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value {text!r} is not valid YAML ({exc})") from None


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_optional(hint: Any) -> bool:
    return type(None) in _options(hint)


def _is_null_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in NULL_WORDS


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ------------------------------------------------------------------------------------ --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], the value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    value = _parse_yaml(raw, f"--set {key}") if raw.strip() else None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``key=value`` set (sections are created as needed; keys are checked on building)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return out
