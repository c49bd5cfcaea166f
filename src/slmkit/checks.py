"""Checks of user-given numbers, one rule each: a bool is not a number, NaN and infinities are not
values, and a failure is an InvalidRequestError naming the parameter."""
from __future__ import annotations

import math
from typing import Any

from .errors import InvalidRequestError


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def shown(value: Any) -> str:
    """A short repr for an error message (a >4300-digit int has no repr in Python >= 3.11)."""
    try:
        r = repr(value)
    except ValueError:
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return r if len(r) <= 40 else f"{type(value).__name__} {r[:37]}..."


def check_int(value: Any, param: str, *, lo: int | None = None, hi: int | None = None,
              what: str | None = None) -> int:
    """value as an int in [lo, hi], or InvalidRequestError(param=param)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(f"must be {what or 'an integer' + _range(lo, hi)}, got {shown(value)}", param=param)
    return value


def check_number(value: Any, param: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, what: str | None = None) -> float:
    """value as a finite float in [lo, hi] ((lo, hi] with lo_open), or InvalidRequestError(param=param)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        v = float(value) if ok else math.nan
    except OverflowError:  # an int too large for a float
        v = math.inf
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise InvalidRequestError(f"must be {what or 'a number' + _range(lo, hi, lo_open)}, got {shown(value)}",
                                  param=param)
    return v
