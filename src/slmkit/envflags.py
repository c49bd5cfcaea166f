"""On/off switches read from the environment: one set of words for every SLMKIT_* switch, in any case,
with spaces around them ignored."""
from __future__ import annotations

OFF_WORDS = frozenset({"0", "off", "false", "no"})
ON_WORDS = frozenset({"1", "on", "true", "yes"})


def is_off(value: str | None) -> bool:
    """Whether an environment value turns a switch off (0 / off / false / no)."""
    return value is not None and value.strip().lower() in OFF_WORDS


def is_on(value: str | None) -> bool:
    """Whether an environment value turns a switch on (1 / on / true / yes)."""
    return value is not None and value.strip().lower() in ON_WORDS
