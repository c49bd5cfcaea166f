"""Small file helpers shared by the loaders."""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import ModelFileError


def shown(path: object, limit: int = 120) -> str:
    """A path as error messages show it, on one line: control characters (a NUL, a newline) escaped,
    a name of thousands of characters cut, with its length."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(path))} characters)"


def expand_user(path: str | Path) -> Path:
    """Path(path).expanduser(), except that "~name" of an unknown user stays as written (and is then
    not found) instead of raising RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def path_error(path: object, err: OSError | ValueError) -> ModelFileError:
    """The error for a path the OS refuses to look at (the name itself, permissions, loops)."""
    if isinstance(err, ValueError):  # os.stat and open refuse an embedded NUL byte with ValueError
        return ModelFileError(shown(path), "the name contains a NUL byte")
    why = {errno.ENAMETOOLONG: f"the name is too long for this system ({len(str(path))} characters)",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ELOOP: "too many levels of symbolic links"}.get(err.errno or 0)
    return ModelFileError(shown(path), why or f"cannot be read ({err.strerror or err})")


def stat_path(path: Path) -> os.stat_result | None:
    """os.stat of path (following links); None where nothing is there; ModelFileError where the OS
    refuses the name (too long, NUL byte, permission) instead of an OSError from deep inside."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise path_error(path, e) from None


def is_regular_file(path: Path) -> bool:
    """True for a regular file. Not for a FIFO or device, which would block or stream on open."""
    st = stat_path(path)
    return st is not None and stat.S_ISREG(st.st_mode)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str, source: object) -> Any:
    """json.loads, with every way a text can fail (syntax, nesting deeper than the parser's stack,
    integers past Python's 4300-digit conversion limit, a lone surrogate escape such as "\\ud800",
    which JSON allows but no text is) a ModelFileError naming source."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ModelFileError(source, "is not usable JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the int digit limit are ValueErrors
        raise ModelFileError(source, f"is not valid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(text) and (bad := _lone_surrogate(obj)) is not None:
        # surrogate pairs (an escaped emoji) are fine; a lone one cannot be encoded, and the
        # tokenizer or the template would fail on it later with a UnicodeEncodeError
        raise ModelFileError(source, f"holds a string with a lone UTF-16 surrogate: {ascii(bad)[:80]}")
    return obj


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) of a parsed JSON document that is not valid Unicode text."""
    stack = [obj]
    while stack:  # iterative: the document may be nested as deep as the parser allows
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


def read_json(path: Path, *, required: bool = True) -> Any:
    """Parse a JSON file; ModelFileError naming it when missing (if required), unreadable or corrupt."""
    if not is_regular_file(path):
        if required:
            st = stat_path(path)
            raise ModelFileError(path, "file is missing" if st is None else "is not a regular file")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"is not valid JSON ({e})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror or e})") from None
    return parse_json(text, path)
