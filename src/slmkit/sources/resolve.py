"""Where a model spec points: the built-in model, ollama:NAME, a local file or folder, or a
Hugging Face hub id (resolved through the local cache, or downloaded with huggingface_hub)."""
from __future__ import annotations

import re
import stat
from pathlib import Path

from ..errors import ModelFileError
from ..loading.files import expand_user, shown, stat_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str | Path) -> Path:
    """Where a model spec points: the built-in model, ollama:NAME, a local file or folder, or an
    'org/name' Hugging Face id (through the local cache or a download)."""
    spec = str(model)
    if spec in BUILTIN_ALIASES:
        from .builtin import builtin_model_path

        return builtin_model_path()
    if spec.startswith("ollama:"):
        from .ollama import resolve_ollama

        return resolve_ollama(spec.removeprefix("ollama:"))
    path = expand_user(model)
    st = stat_path(path)  # a name the OS refuses (too long, NUL byte, permission) is named as such
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):  # a FIFO would block the reader
            raise ModelFileError(shown(path), "is neither a model file nor a folder (a FIFO, socket or device)")
        return path
    if not _HUB_ID.match(spec):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFileError(model, "not a local folder, and huggingface_hub is not installed to fetch it") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: say so plainly
        why = " ".join(str(e).split())  # hub errors span lines; the CLI prints one
        raise ModelFileError(shown(model), f"not a local folder and could not be downloaded ({type(e).__name__}: "
                             f"{why})") from None


BUILTIN_ALIASES = ("builtin", "gemma3-270m")
