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
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?$")  # registry, e.g. localhost:5000
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
MAX_MANIFEST_BYTES = 1 << 20
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def store_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def parse_name(name: str) -> tuple[str, str, str, str]:
    """'phi3.5' / 'phi3.5:3.8b' / 'user/model:tag' / 'host/ns/model:tag' -> (registry, namespace, model, tag)."""
    head, _, last = name.rpartition("/")  # the tag hangs off the last segment: host:port/ns/model:tag
    model, _, tag = last.partition(":")
    tag = tag or "latest"
    parts = (head.split("/") if head else []) + [model]
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    if (len(parts) != 3 or not _HOST.match(parts[0]) or not all(_PART.match(p) for p in (*parts[1:], tag))
            or ".." in (*parts, tag)):
        raise InvalidRequestError(f"not a valid Ollama model name: {name!r}", param="model")
    return parts[0], parts[1], parts[2], tag


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ModelFileError(path, f"resolves outside the Ollama store {root}")
    return resolved


def _find(base: Path, parts: list[str]) -> Path | None:
    """base/parts..., matching each part exactly or else case-insensitively (Ollama compares names
    case-insensitively but keeps their case on disk)."""
    path = base
    for part in parts:
        exact = path / part
        if exact.exists():
            path = exact
            continue
        try:
            match = next((p for p in path.iterdir() if p.name.lower() == part.lower()), None)
        except OSError:
            return None
        if match is None:
            return None
        path = match
    return path if path.is_file() else None


def resolve_ollama(name: str, root: Path | None = None) -> Path:
    """Path of the GGUF blob for an Ollama model name."""
    root = root or store_root()
    if not root.is_dir():
        raise ModelFileError(root, "the Ollama store (OLLAMA_MODELS or ~/.ollama/models) is not a directory")
    registry, namespace, model, tag = parse_name(name)
    manifest = _find(root / "manifests", [registry, namespace, model, tag])
    if manifest is None:
        raise ModelFileError(root, f"Ollama model {name!r} is not in the store (no manifest)")
    manifest = _inside(root, manifest)
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelFileError(manifest, f"is larger than {MAX_MANIFEST_BYTES} bytes: not an Ollama manifest")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(manifest, f"is not a valid Ollama manifest ({type(e).__name__})") from None
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
    hexd = m.group(1)
    blob = root / "blobs" / f"sha256-{hexd}"
    if not blob.is_file():
        blob = root / "blobs" / f"sha256-{hexd.lower()}"
    blob = _inside(root, blob)
    if not blob.is_file():
        raise ModelFileError(blob, f"model blob of {name!r} is missing from the store")
    return blob
