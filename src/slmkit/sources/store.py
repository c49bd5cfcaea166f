"""The local model store: what `slm pull` downloaded and `slm import` registered.

Root: $SLMKIT_HOME, else $XDG_CACHE_HOME/slmkit, else ~/.cache/slmkit (the built-in model's cache
shares it). Layout:
  index.json                  name -> {path, source, format, quant, imported, added}
  models/<name>/<tag>/        files pulled from the Hugging Face hub (a folder, or one .gguf)
  blobs/sha256-<hex>          blobs pulled from an Ollama registry; manifests/<host>/<ns>/<model>/<tag>
Names are catalog names with their tag (`phi3.5:bf16`), `ollama:NAME:TAG`, or the name given to
`slm import`. An imported entry points at the user's own files: `slm rm` forgets it, never deletes
them. A pulled entry's files are deleted, and only when they resolve inside the store.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelFileError, UnknownModelError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")


def home() -> Path:
    env = os.environ.get("SLMKIT_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slmkit"


def check_name(name: str) -> str:
    """A store name: no absolute path, no '..' segment, no odd characters (it becomes a folder name)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise InvalidRequestError(f"{name!r}: a store name must not be an absolute path", param="name")
    if any(part in ("..", ".") for part in re.split(r"[/:\\]", name)) or not _NAME.match(name):
        raise InvalidRequestError(f"{name!r}: a store name may hold letters, digits and ._:-/ and no '..' segment",
                                  param="name")
    return name


def folder_for(name: str) -> Path:
    """models/<name with ':' and '/' as folder separators>, checked to stay inside the store."""
    check_name(name)
    root = (home() / "models").resolve()
    path = (root / name.replace(":", "/")).resolve()
    if not path.is_relative_to(root) or path == root:
        raise InvalidRequestError(f"{name!r} resolves outside the store {root}", param="name")
    return path


# ------------------------------------------------------------------ the index
def _index_path() -> Path:
    return home() / "index.json"


def load_index() -> dict[str, dict[str, Any]]:
    p = _index_path()
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(p, f"the store index is unreadable ({type(e).__name__}); remove it to start over"
                             ) from None
    return data.get("models", {}) if isinstance(data, dict) else {}


def _save_index(models: dict[str, dict[str, Any]]) -> None:
    p = _index_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".index-")  # rename: a reader never sees half a file
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"models": models}, f, indent=1)
    os.replace(tmp, p)


def register(name: str, path: Path, *, source: str, fmt: str, quant: str | None, imported: bool) -> dict[str, Any]:
    check_name(name)
    models = load_index()
    models[name] = {"path": str(path), "source": source, "format": fmt, "quant": quant, "imported": imported,
                    "added": time.time()}
    _save_index(models)
    return models[name]


def find(name: str) -> dict[str, Any] | None:
    """The store entry for a name: exact, or a catalog name without its tag (`phi3.5` -> `phi3.5:bf16`)."""
    models = load_index()
    if name.startswith("ollama:") and name not in models:
        from .pull import ollama_store_name

        try:
            name = ollama_store_name(name.removeprefix("ollama:"))  # ollama:phi3.5 -> ollama:phi3.5:latest
        except InvalidRequestError:
            return None
    if name in models:
        return {"name": name, **models[name]}
    from .catalog import is_catalog_name, lookup

    if is_catalog_name(name):
        entry, variant = lookup(name)
        full = f"{entry.name}:{variant.tag}"
        if full in models:
            return {"name": full, **models[full]}
    return None


def _sizes(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, mtime = 0, 0.0
    for p in path.rglob("*"):
        if p.is_file() and ".cache" not in p.parts:
            st = p.stat()
            size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return size, mtime


def list_models() -> list[dict[str, Any]]:
    """name, path, size (bytes), quant, modified (epoch seconds), format, imported, present."""
    out = []
    for name, e in sorted(load_index().items()):
        path = Path(e["path"])
        present = path.exists()
        size, mtime = _sizes(path) if present else (0, 0.0)
        out.append({"name": name, "path": str(path), "size": size, "quant": e.get("quant"),
                    "modified": mtime or e.get("added"), "format": e.get("format"), "source": e.get("source"),
                    "imported": bool(e.get("imported")), "present": present})
    return out


def import_path(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Register a Hugging Face folder (config.json + *.safetensors) or a .gguf file without copying."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
            raise ModelFileError(p, "is not a Hugging Face model folder (config.json + *.safetensors)")
        fmt = "safetensors"
    elif p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(p, "is not a GGUF file (no GGUF magic)")
        fmt = "gguf"
    else:
        raise ModelFileError(p, "no such file or folder to import")
    name = check_name(name or p.name.removesuffix(".gguf"))
    from .memplan import shape_for

    _, quant = shape_for(p)
    return {"name": name, **register(name, p, source=f"import:{p}", fmt=fmt, quant=quant, imported=True)}


def remove(name: str) -> dict[str, Any]:
    """Forget a store entry; delete its files when they were pulled into the store (never outside it)."""
    import shutil

    check_name(name)
    found = find(name)
    if found is None:
        raise UnknownModelError(f"{name!r} is not in the store (`slm list` shows what is)", name=name,
                                suggestions=sorted(load_index()))
    models = load_index()
    path = Path(found["path"])
    if not found.get("imported"):
        root = home().resolve()
        real = path.resolve()
        if not real.is_relative_to(root) or real == root:
            raise InvalidRequestError(f"{name!r} points outside the store ({real}); not deleting it", param="name")
        if found.get("format") == "ollama":
            _release_blob(real, models, found["name"])
        elif real.is_dir():
            shutil.rmtree(real)
        elif real.exists():
            real.unlink()
    del models[found["name"]]
    _save_index(models)
    return found


def _release_blob(blob: Path, models: dict[str, dict[str, Any]], name: str) -> None:
    """Delete an Ollama blob unless another entry still uses it (tags share blobs)."""
    others = [n for n, e in models.items() if n != name and Path(e["path"]).resolve() == blob]
    if not others and blob.exists():
        blob.unlink()


# ------------------------------------------------------------------ show
_VISION_TYPES = {"phi3_v", "phi4mm", "phi4_multimodal", "gemma3", "llava", "mllama"}


def _readme_licence(folder: Path) -> str | None:
    try:
        head = (folder / "README.md").read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return None
    m = re.search(r"^licen[sc]e:\s*(\S+)", head, re.M)
    return m.group(1) if m else None


def _describe_folder(folder: Path) -> dict[str, Any]:
    from .memplan import shape_from_folder

    shape, quant = shape_from_folder(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif (folder / "tokenizer_config.json").is_file():
        try:
            template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            template = None
    return {"architecture": cfg.get("model_type"), "parameters": shape.params, "quantization": quant,
            "context": shape.context, "template": template if isinstance(template, str) else None,
            "licence": _readme_licence(folder), "vision": cfg.get("model_type") in _VISION_TYPES}


def _describe_gguf(path: Path) -> dict[str, Any]:
    from .memplan import shape_from_gguf

    shape, quant = shape_from_gguf(path)
    from ..gguf.reader import open_gguf

    with open_gguf(path, lazy_strings=True) as f:
        meta, arch = f.metadata, f.architecture
    template = meta.get("tokenizer.chat_template")
    return {"architecture": arch, "parameters": shape.params, "quantization": quant, "context": shape.context,
            "template": template if isinstance(template, str) else None,
            "licence": meta.get("general.license"), "vision": arch in _VISION_TYPES}


def show(name: str) -> dict[str, Any]:
    """architecture, parameters, quantization, context, template, licence, capabilities of a stored
    model, a local folder / GGUF, or (not pulled yet) a catalog entry's own numbers."""
    from .catalog import is_catalog_name, lookup

    found = find(name)
    path = Path(found["path"]) if found else Path(name).expanduser()
    info: dict[str, Any] = {"name": found["name"] if found else name, "path": str(path) if path.exists() else None,
                            "installed": found is not None}
    entry = lookup(name)[0] if is_catalog_name(name) else None
    if path.is_dir():
        info |= _describe_folder(path)
    elif path.is_file():
        info |= _describe_gguf(path)
    elif entry is None:
        import difflib

        from .catalog import entries

        close = difflib.get_close_matches(name, [*load_index(), *entries()], n=3, cutoff=0.5)
        raise UnknownModelError(f"{name!r} is neither in the store, a local model nor in the catalog"
                                + (f"; did you mean {' or '.join(close)}?" if close else ""), name=name,
                                suggestions=close)
    if entry is not None:
        variant = lookup(name)[1]
        info.setdefault("architecture", entry.arch["model_type"])
        info.setdefault("parameters", entry.params)
        info.setdefault("quantization", variant.quant)
        info.setdefault("context", entry.context)
        info.setdefault("template", None)
        info["licence"] = info.get("licence") or entry.licence
        info["vision"] = info.get("vision") or "image" in entry.modalities
        info["catalog"] = entry.as_dict()
    caps = ["completion"] + (["chat"] if info.get("template") or (entry and entry.name != "builtin") else [])
    caps += ["vision"] if info.pop("vision", False) else []
    caps += ["tools"] if "tool" in str(info.get("template") or "") else []
    info["capabilities"] = caps
    return info
