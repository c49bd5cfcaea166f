"""Find a model in an existing Ollama store: `ollama:phi3.5` -> the GGUF blob of that manifest.

Layout: $OLLAMA_MODELS (default ~/.ollama/models)/manifests/<registry>/<namespace>/<model>/<tag>
is a JSON manifest whose layer of mediaType application/vnd.ollama.image.model names the blob
"sha256:<hex>", stored at blobs/sha256-<hex>. Names and digests are checked against strict
patterns and every resolved path must stay inside the store: no traversal through either.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import InvalidRequestError, ModelFileError

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def store_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def parse_name(name: str) -> tuple[str, str, str, str]:
    """'phi3.5' / 'phi3.5:3.8b' / 'user/model:tag' / 'host/ns/model:tag' -> (registry, namespace, model, tag)."""
    ref, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = ref.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    if len(parts) != 3 or not all(_PART.match(p) for p in (*parts, tag)) or ".." in (*parts, tag):
        raise InvalidRequestError(f"not a valid Ollama model name: {name!r}", param="model")
    return parts[0], parts[1], parts[2], tag


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ModelFileError(path, f"resolves outside the Ollama store {root}")
    return resolved


def resolve_ollama(name: str, root: Path | None = None) -> Path:
    """Path of the GGUF blob for an Ollama model name."""
    root = root or store_root()
    registry, namespace, model, tag = parse_name(name)
    manifest = _inside(root, root / "manifests" / registry / namespace / model / tag)
    if not manifest.is_file():
        raise ModelFileError(manifest, f"Ollama model {name!r} is not in the store {root} (no manifest)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(manifest, f"is not a valid Ollama manifest ({e})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise ModelFileError(manifest, "has no 'layers' list")
    digests = [layer.get("digest") for layer in layers
               if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if len(digests) != 1:
        raise ModelFileError(manifest, f"must have exactly one layer of type {MODEL_MEDIA_TYPE}, has {len(digests)}")
    m = _DIGEST.match(str(digests[0]))
    if not m:
        raise ModelFileError(manifest, f"model layer digest {digests[0]!r} is not 'sha256:<64 hex>'")
    blob = _inside(root, root / "blobs" / f"sha256-{m.group(1)}")
    if not blob.is_file():
        raise ModelFileError(blob, f"model blob of {name!r} is missing from the store")
    return blob
