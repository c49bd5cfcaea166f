"""`slmkit.load("provider:model")`: which backend a model string names, and opening it.

    github:microsoft/Phi-3.5-mini-instruct     azure:Phi-3.5-vision-instruct
    nim:microsoft/phi-3.5-vision-instruct       openai:<model>@<base_url>
    ollama+http://host:11434/phi3.5             transformers:./folder    onnx:./folder
    llamacpp:./x.gguf    openvino:./folder    mlx:./folder    qnn:./folder

A string without a known provider prefix (a path, a hub id, "builtin", "ollama:NAME" from the local
Ollama store) is the native engine's. Each provider's module has `open(target, **options) ->
Backend`; its optional dependencies are imported there, and a missing one is a
BackendUnavailableError naming the extra to install.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import BackendUnavailableError, InvalidRequestError

# provider -> (module under slmkit.backends, the pip extra that brings its dependencies)
PROVIDERS: dict[str, tuple[str, str | None]] = {
    "github": ("cloud", "cloud"), "azure": ("cloud", "cloud"), "nim": ("cloud", "cloud"), "openai": ("cloud", "cloud"),
    "ollama+http": ("ollama_http", "ollama"), "ollama+https": ("ollama_http", "ollama"),
    "transformers": ("transformers_backend", "transformers"), "onnx": ("onnx", "onnx"),
    "llamacpp": ("llamacpp", "llamacpp"), "openvino": ("openvino", "openvino"), "mlx": ("mlx", "mlx"),
    "qnn": ("qnn", "qnn"),
}


def split_spec(model: str) -> tuple[str | None, str]:
    """(provider, target) of a model string; provider None: the native engine. For ollama+http(s)
    the target is the whole URL (http://host:port/name)."""
    head, sep, rest = model.partition(":")
    key = head.lower()
    if not sep or key not in PROVIDERS:
        return None, model
    if key.startswith("ollama+"):
        return key, f"{key.removeprefix('ollama+')}:{rest}"
    if not rest:
        raise InvalidRequestError(f"{head}: needs a model after the colon, e.g. {head}:{_EXAMPLES.get(key, 'NAME')}",
                                  param="model")
    return key, rest


_EXAMPLES = {"github": "microsoft/Phi-3.5-mini-instruct", "azure": "Phi-3.5-mini-instruct",
             "nim": "microsoft/phi-3.5-mini-instruct", "openai": "MODEL@http://localhost:8000/v1",
             "transformers": "./folder", "onnx": "./folder", "llamacpp": "./model.gguf", "openvino": "./folder",
             "mlx": "./folder", "qnn": "./folder"}


def open_backend(provider: str, target: str, **options: Any) -> Any:
    """The Backend for provider:target (options: what that provider's open() takes)."""
    if provider not in PROVIDERS:
        raise InvalidRequestError(f"unknown backend {provider!r} (available: native, {', '.join(PROVIDERS)})",
                                  param="backend")
    module_name, extra = PROVIDERS[provider]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"{__package__}.{module_name}"):
            raise BackendUnavailableError(provider, "is not part of this slmkit build") from None
        raise BackendUnavailableError(provider, f"needs the package {e.name!r}", extra=extra) from None
    return module.open(provider, target, **options)
