"""A GGUF string array whose strings are decoded when first used.

Most of a GGUF header can be one array: the 262k-token vocabulary of Gemma 3 (and, for byte-level BPE,
its merges). Decoding it into Python strings took 0.08 of the 0.10 s the built-in model's header took to
parse, on every load, though its tokenizer comes from slmkit's load cache once the file has been loaded
(the cache is checked against the header's bytes, so those strings were decoded and checked when it was
written). The reader checks every length against the file while parsing (a truncated or hostile array
fails there) and keeps the array's bytes; they are decoded on first use (or at once: open_gguf's
default), where a string that is not UTF-8 raises a GGUFError naming the key and the string's index.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

__all__ = ["StringArray"]

_U64 = struct.Struct("<Q")


class StringArray(Sequence[str]):
    """count GGUF strings (each a u64 length then UTF-8 bytes) in raw: a read-only sequence of str."""

    __slots__ = ("_raw", "_count", "_key", "_path", "_items")

    def __init__(self, raw: bytes, count: int, key: str, path: Path):
        self._raw, self._count, self._key, self._path = raw, count, key, path
        self._items: list[str] | None = None

    def to_list(self) -> list[str]:
        """The strings (decoded once; the same list every call: do not modify it)."""
        if self._items is None:
            self._items = self._decode()
        return self._items

    def _decode(self) -> list[str]:
        raw, unpack, pos = self._raw, _U64.unpack_from, 0
        out: list[str] = []
        append = out.append
        for i in range(self._count):
            (n,) = unpack(raw, pos)
            try:
                append(raw[pos + 8:pos + 8 + n].decode())  # UTF-8, strict (the method: faster than str())
            except UnicodeDecodeError as e:
                from .reader import GGUFError

                raise GGUFError(self._path, self._key,
                                f"string [{i}] is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            pos += 8 + n
        return out

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.to_list()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_list())

    def __contains__(self, x: object) -> bool:
        return x in self.to_list()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StringArray, list, tuple)):
            return self.to_list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings of {self._key!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as the plain list it stands for
        return (list, (self.to_list(),))
