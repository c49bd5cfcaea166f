"""The model catalog: short names (`phi3.5`, `phi4-mini`, `builtin`, ...) for the Phi family and
the built-in model, each with its size, context, modalities, licence, the Hugging Face repos of
its variants (safetensors, GGUF, ONNX; a tag such as `phi3.5:q4_k_m` picks one), its Ollama tag
and its id at each cloud provider. The data lives in catalog.json beside this file."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UnknownModelError

CATALOG_FILE = Path(__file__).with_name("catalog.json")


@dataclass(frozen=True)
class Variant:
    """One downloadable form of a model: `format` safetensors | gguf | onnx | package."""

    tag: str
    format: str
    quant: str
    bits: float  # bits per weight, scales included
    repo: str | None = None
    file: str | None = None  # gguf: the one file to fetch
    subfolder: str | None = None  # onnx: the folder inside the repo
    package: str | None = None  # the built-in model ships as a Python package


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    params: int
    context: int
    modalities: tuple[str, ...]
    licence: str
    arch: dict[str, Any]  # model_type, layers, kv_heads, head_dim, hidden
    ollama: str | None
    cloud: dict[str, str | None]
    default: str
    variants: dict[str, Variant]
    vision: dict[str, Any] | None = None  # params, tokens_per_image
    moe: dict[str, Any] | None = None  # experts, active, expert_params, active_params
    extra: dict[str, Any] = field(default_factory=dict)

    def variant(self, tag: str | None) -> Variant:
        if tag is None:
            return self.variants[self.default]
        if tag not in self.variants:
            raise UnknownModelError(f"{self.name} has no tag {tag!r}; its tags: {', '.join(self.variants)}",
                                    name=f"{self.name}:{tag}", suggestions=list(self.variants))
        return self.variants[tag]

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "title", "params", "context", "licence", "arch", "ollama", "cloud",
                                           "default", "vision", "moe")}
        d["modalities"] = list(self.modalities)
        d["variants"] = {t: {k: v for k, v in vars(var).items() if v is not None and k != "tag"}
                         for t, var in self.variants.items()}
        return d


@lru_cache(maxsize=1)
def entries() -> dict[str, Entry]:
    """Every catalog entry by name, in the file's order."""
    raw = json.loads(CATALOG_FILE.read_text(encoding="utf-8"))["models"]
    out = {}
    for name, e in raw.items():
        variants = {t: Variant(tag=t, **v) for t, v in e.pop("variants").items()}
        out[name] = Entry(name=name, modalities=tuple(e.pop("modalities")), variants=variants, **e)
    return out


def split(spec: str) -> tuple[str, str | None]:
    """'phi3.5:q4_k_m' -> ('phi3.5', 'q4_k_m'); 'phi3:mini' is a name of its own -> ('phi3:mini', None);
    'phi3:mini:q4' -> ('phi3:mini', 'q4'). A spec that is no catalog name returns (spec, None)."""
    cat = entries()
    if spec in cat:
        return spec, None
    head, sep, tag = spec.rpartition(":")
    if sep and head in cat:
        return head, tag
    return spec, None


def is_catalog_name(spec: str) -> bool:
    return split(spec)[0] in entries()


def lookup(spec: str) -> tuple[Entry, Variant]:
    """The entry and variant a spec names; an unknown name suggests the closest names, an unknown
    tag lists the tags that exist (UnknownModelError)."""
    name, tag = split(spec)
    cat = entries()
    if name not in cat:
        close = difflib.get_close_matches(name.lower(), list(cat), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(cat)}"
        raise UnknownModelError(f"{spec!r} is not in the catalog{hint} (`slm catalog` lists them)",
                                name=spec, suggestions=close)
    entry = cat[name]
    return entry, entry.variant(tag)
