"""Shared config plumbing: a dataclass built from config.json, filtered to known fields."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, TypeVar

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


def require_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def require_float(name: str, value: Any, *, positive: bool = True) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value  # NaN
            or (positive and not value > 0)):
        raise ConfigError(name, f"must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)
