"""`qnn:./folder`: an ONNX Runtime GenAI folder (backends/onnx.py) run through ONNX Runtime's QNN
execution provider (Qualcomm NPUs; Windows on Snapdragon in practice): og.Config with the QNN
provider, then the same loop as onnx:.

Two ways the provider comes:
- onnxruntime-qnn >= 2: a plugin library next to a standard onnxruntime; registered with ORT GenAI
  here, with the backend library chosen by `qnn_backend=` ("htp", the NPU, by default; "gpu"; "cpu"
  where the wheel ships it);
- an onnxruntime build with QNN bundled (onnxruntime-qnn 1.x): QNNExecutionProvider already in
  onnxruntime.get_available_providers().
Without either: a BackendUnavailableError naming the package and the platform.

Tested here (Linux x86_64) only for the unavailable error unless onnxruntime-qnn's plugin is
importable: its Linux x86_64 wheel runs the HTP backend without a Qualcomm device, and where ONNX
Runtime assigns nodes to the CPU instead (it may, for shape ops or what HTP cannot take) the result
is still the provider's. A real Snapdragon NPU is not exercised here.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InvalidRequestError
from .onnx import OnnxBackend, check_options, import_og, load

EP = "QNNExecutionProvider"
NEEDS = ("needs ONNX Runtime's QNN execution provider: the onnxruntime-qnn package, for Qualcomm "
         "Snapdragon NPUs (Windows on ARM64 in practice)")


_registered: set[str] = set()


class QnnBackend(OnnxBackend):
    provider = "qnn"


def plugin() -> Any:
    """onnxruntime_qnn (the >= 2 plugin package), or None when it is not installed."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return onnxruntime_qnn


def bundled() -> bool:
    """onnxruntime itself has the QNN provider (onnxruntime-qnn 1.x builds)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return EP in onnxruntime.get_available_providers()


def open(provider: str, target: str, *, qnn_backend: str = "htp",  # noqa: A001 -- registry contract
         **options: Any) -> QnnBackend:
    og = import_og(provider, "qnn")
    check_options(provider, target=target, **options)
    qnn = plugin()
    if qnn is None and not bundled():
        raise BackendUnavailableError(provider, f"{NEEDS}; this {platform.system()} {platform.machine()} "
                                      "Python has neither its plugin nor an onnxruntime built with it", extra="qnn")
    if qnn is None:  # the provider-bridge build: ORT GenAI knows it as "qnn"
        name, provider_options = "qnn", {}
    else:
        paths = {"htp": qnn.get_qnn_htp_path, "gpu": qnn.get_qnn_gpu_path, "cpu": qnn.get_qnn_cpu_path}
        if qnn_backend not in paths:
            raise InvalidRequestError(f"must be one of {', '.join(paths)}", param="qnn_backend")
        library = Path(paths[qnn_backend]())
        if not library.is_file():
            raise BackendUnavailableError(provider, f"onnxruntime-qnn has no {qnn_backend} backend on this platform "
                                          f"({library.name} missing)")
        if EP not in _registered:  # once per process: ORT GenAI refuses a second registration
            og.register_execution_provider_library(EP, qnn.get_library_path())
            _registered.add(EP)
        name, provider_options = EP, {"backend_path": str(library)}

    def config(folder: Path) -> Any:
        cfg = og.Config(str(folder))
        cfg.clear_providers()
        cfg.append_provider(name)
        for key, value in provider_options.items():
            cfg.set_provider_option(name, key, value)
        return cfg

    return load(QnnBackend, og, target, config)
