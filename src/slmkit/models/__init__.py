"""One module per architecture, named after HF `model_type`; looked up, not registered."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

# model_type values that share an implementation with another module
MODEL_REMAPPING = {"phi3": "phi3", "phi3_v": "phi3_v", "gemma3_text": "gemma3", "phimoe": "phimoe"}
SUPPORTED = ("phi3", "phi3_v", "gemma3", "phimoe")
# GGUF general.architecture -> the module whose GGUF_LAYER_NAMES / gguf_config read such a file
GGUF_ARCHITECTURES = {"phi3": "phi3", "gemma3": "gemma3", "phimoe": "phimoe"}


def keep_float_modules(model: object) -> frozenset[int]:
    """ids of the modules a model keeps in float (its `keep_float` name prefixes, e.g. a vision
    tower): quantization and weight packing leave them as they are."""
    prefixes = tuple(getattr(model, "keep_float", ()))
    named = getattr(model, "named_modules", None)
    if not prefixes or named is None:
        return frozenset()
    return frozenset(id(m) for name, m in named() if name.startswith(prefixes))


def keep_mapped_modules(model: object) -> frozenset[int]:
    """ids of the linears whose name contains one of the model's `keep_mapped` fragments (MoE
    experts): weight packing does not copy them, so they stay memory-mapped and an expert no token
    chooses is never read (quantization still swaps them when asked)."""
    fragments = tuple(getattr(model, "keep_mapped", ()))
    named = getattr(model, "named_modules", None)
    if not fragments or named is None:
        return frozenset()
    return frozenset(id(m) for name, m in named() if any(f in name for f in fragments))


def get_model_module(model_type: object) -> ModuleType:
    """The module (with ModelArgs, Model, sanitize) implementing `model_type`."""
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError(f"config.json has no usable model_type ({model_type!r})")
    name = MODEL_REMAPPING.get(model_type, model_type)
    if name not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_REMAPPING))})"
        )
    return importlib.import_module(f"{__name__}.{name}")
