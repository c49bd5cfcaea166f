"""Small file helpers shared by the loaders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelFileError


def read_json(path: Path, *, required: bool = True) -> Any:
    """Parse a JSON file; ModelFileError naming it when missing (if required), unreadable or corrupt."""
    if not path.is_file():
        if required:
            raise ModelFileError(path, "file is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"is not valid JSON ({e})") from None
