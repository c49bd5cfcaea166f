"""Shared config plumbing: a dataclass built from config.json, filtered to known fields."""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T", bound="BaseArgs")


@dataclasses.dataclass
class BaseArgs:
    """Base for per-architecture args. `from_dict` ignores unknown keys, names missing ones."""

    @classmethod
    def from_dict(cls: type[T], params: Mapping[str, Any], *, path: object | None = None) -> T:
        if not isinstance(params, Mapping):
            raise ConfigError("<root>", "config must be a JSON object", path=path)
        fields = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in params.items() if k in fields}
        for name, p in fields.items():
            if p.default is inspect.Parameter.empty and name not in kwargs:
                raise ConfigError(name, "is required but missing", path=path)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if path is not None and e.path is None:
                raise ConfigError(e.field, str(e).split(": ", 1)[-1], path=path) from None
            raise


MAX_POSITIONS = 2**31  # no model has a context near this; a larger one only overflows arithmetic later


def require_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(name, f"must be an integer {bound}, got {short_repr(value)}")
    return value


def require_float(name: str, value: Any, *, positive: bool = True) -> float:
    """A finite number (positive unless told): NaN, infinities and integers too large for a float
    (which would raise OverflowError later) are ConfigErrors naming the field."""
    kind = f"a finite {'positive ' if positive else ''}number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be {kind}, got {short_repr(value)}")
    try:
        f = float(value)
    except OverflowError:
        raise ConfigError(name, f"must be {kind}, got {short_repr(value)}") from None
    if not math.isfinite(f) or (positive and not f > 0):
        raise ConfigError(name, f"must be {kind}, got {short_repr(value)}")
    return f


def gguf_value(meta: Mapping[str, Any], key: str, default: Any = ..., kind: type = int) -> Any:
    """A GGUF metadata value, checked: a positive integer (kind=int) or a number (kind=float);
    `default` when absent (required when no default is given)."""
    if key not in meta or meta[key] is None:
        if default is ...:
            raise ConfigError(key, "is required in the GGUF metadata but missing")
        return default
    return require_int(key, meta[key]) if kind is int else require_float(key, meta[key])


def short_repr(value: Any) -> str:
    """repr for a message, cut; an int too long to print (Python's 4300-digit limit) by its size."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({type(value).__name__})"
