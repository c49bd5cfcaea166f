"""`openvino:./folder`: OpenVINO runs the model; our tokenizer, template and sampler do the rest
(backends/runtime.py).

The folder is either an OpenVINO export (openvino_model.xml + .bin beside config.json and the
tokenizer files, as optimum-cli / optimum-intel write it: stateful, the KV cache held inside the
infer request, inputs input_ids / attention_mask / position_ids and optionally beam_idx) or a
Hugging Face folder, exported on load into a cache folder (said in a log line) by export() below.

export() uses OpenVINO's own PyTorch converter (openvino.convert_model over the transformers model,
its KV cache as explicit inputs and outputs) and then OpenVINO's make-stateful transformation,
which gives the layout optimum-intel writes. A sliding-window model keeps its whole past as state
(the window is applied by the mask); a LongRoPE model is refused (tracing would freeze its short/long
switch): export those with optimum-cli and pass the folder. optimum-intel itself is not used: 1.15 imports
openvino.runtime, which OpenVINO 2026 removed, and 2.2 requires transformers < 5.6 (and
torchvision). openvino-genai's LLMPipeline is not used either: it samples inside and exposes no
per-step logits, which our sampler needs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import (
    BackendUnavailableError,
    InvalidRequestError,
    ModelFileError,
    UnsupportedByBackendError,
    UnsupportedModelError,
)
from .runtime import RuntimeBackend, hf_folder_info

log = logging.getLogger(__name__)

XML = "openvino_model.xml"
PRECISIONS = {"auto": "f32", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # INFERENCE_PRECISION_HINT
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "added_tokens.json", "generation_config.json")


def import_ov(provider: str) -> Any:
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs openvino ({e})", extra="openvino") from None
    return openvino


# ---------------------------------------------------------------------------------------------- export
def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


class _WithExplicitCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, k0, v0, k1, ...) -> (logits, k0', v0', ...):
    the transformers model with its DynamicCache filled from inputs, so a tracer sees the KV cache."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        # full layers even for a sliding-window model: the window is the mask's (on absolute positions), and
        # the whole past stays an input. Set, not update(): its lazy init concatenates to a 1-d [].
        layers: list[Any] = []
        for i in range(len(past) // 2):
            layer = DynamicLayer()
            layer.device, layer.keys, layer.values, layer.is_initialized = past[2 * i].device, past[2 * i], \
                past[2 * i + 1], True
            layers.append(layer)
        cache = DynamicCache()
        cache.layers = layers
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export(hf_folder: Path, out: Path) -> Path:
    """Write hf_folder's model as a stateful float32 OpenVINO model (plus config and tokenizer files) into out."""
    ov = import_ov("openvino")
    from openvino._offline_transformations import apply_make_stateful_transformation

    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise BackendUnavailableError("openvino", f"exporting a Hugging Face folder needs transformers ({e})",
                                      extra="openvino") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager").eval()
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(hf_folder, f"transformers cannot load it for export ({type(e).__name__}: {e})") from None
    rope = getattr(model.config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in ("longrope", "su"):  # the short/long switch is a branch
        raise UnsupportedModelError(f"{hf_folder}: openvino: export of a LongRoPE model is not supported here (a "
                                    "traced graph would keep one set of factors); export it with optimum-cli "
                                    "export openvino and pass that folder")
    layers, kv_heads, head_dim = _kv_shape(model.config)
    past_len, new = 3, 2  # any lengths > 0: the traced graph keeps them dynamic
    example = (torch.tensor([[5, 9]]), torch.ones(1, past_len + new, dtype=torch.int64),
               torch.tensor([[past_len, past_len + 1]]),
               *[torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)])
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on shapes it keeps constant (the
        warnings.simplefilter("ignore")  # mask's padding, always 0 here) are not the user's business
        try:
            ov_model = ov.convert_model(_WithExplicitCache(model), example_input=example)
        except Exception as e:  # the converter raises plain RuntimeError (or the tracer's own) on what it cannot trace
            raise UnsupportedModelError(f"{hf_folder}: openvino: OpenVINO's converter cannot trace this model "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); export "
                                        "it with optimum-cli export openvino and pass that folder") from None
    for port, name in zip(ov_model.inputs, ["input_ids", "attention_mask", "position_ids"]
                          + [f"past_key_values.{n}" for n in kv]):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, ["logits"] + [f"present.{n}" for n in kv]):
        port.get_tensor().set_names({name})
    apply_make_stateful_transformation(ov_model, {f"past_key_values.{n}": f"present.{n}" for n in kv})
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, out / XML, compress_to_fp16=False)
    model.config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (hf_folder / name).is_file():
            shutil.copyfile(hf_folder / name, out / name)
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("SLMKIT_HOME") or Path.home() / ".cache" / "slmkit").expanduser() / "openvino"


def exported(hf_folder: Path, cache_dir: Path | None = None) -> Path:
    """The cached export of hf_folder (made now if missing); keyed on its config and weight files."""
    digest = hashlib.sha256((hf_folder / "config.json").read_bytes())
    for f in sorted(hf_folder.glob("*.safetensors")) + sorted(hf_folder.glob("*.bin")):
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = Path(cache_dir).expanduser() if cache_dir else _cache_root()
    target = root / f"{hf_folder.resolve().name}-{digest.hexdigest()[:16]}"
    if (target / XML).is_file():
        return target
    log.warning("openvino: exporting %s to %s (OpenVINO's PyTorch converter, float32, stateful KV cache)",
                hf_folder, target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".export-"))
    try:
        export(hf_folder, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- run
class OpenVinoBackend(RuntimeBackend):
    """A RuntimeBackend over one stateful OpenVINO infer request (its states: the KV cache)."""
    provider = "openvino"
    has_full_logits = True

    def __init__(self, compiled: Any, kv: tuple[int, int], *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.request = compiled.create_infer_request()
        inputs = {name for port in compiled.inputs for name in port.get_names()}
        self._beam = "beam_idx" in inputs  # optimum's exports reorder (and size) the cache through it
        self._kv_heads, self._head_dim = kv  # of a state when the export has no beam_idx to size it
        self._n = 0  # tokens in the cache

    def reset(self) -> None:
        self.request.reset_state()
        if not self._beam:  # a state without beam_idx starts with no shape: give it [1, kv heads, 0, head dim]
            empty = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=np.float32)
            for state in self.request.query_state():
                state.state = type(state.state)(empty)
        self._n = 0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, self._n + n), dtype=np.int64),
                "position_ids": np.arange(self._n, self._n + n, dtype=np.int64)[None]}
        if self._beam:
            feed["beam_idx"] = np.zeros(1, dtype=np.int32)
        logits = self.request.infer(feed)["logits"]
        self._n += n
        return np.asarray(logits, dtype=np.float32)[0]  # [n or 1, vocab]

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self.reset()
        return torch.from_numpy(self._run(ids)[-1, : self.vocab_size].copy())

    def step(self, token: int) -> torch.Tensor:
        return torch.from_numpy(self._run([token])[-1, : self.vocab_size].copy())

    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        self.reset()
        out = self._run(ids)
        self.reset()
        if out.shape[0] != len(ids):  # an export that keeps only the last position's logits
            raise UnsupportedByBackendError("logits", self.provider, "this export returns the last position only")
        return torch.from_numpy(out[:, : self.vocab_size].copy())


def open(provider: str, target: str, *, dtype: str = "auto", device: str = "cpu",  # noqa: A001 -- registry contract
         cache_dir: str | None = None, **options: Any) -> OpenVinoBackend:
    ov = import_ov(provider)
    for name in options:
        if name in ("quant", "group_size"):
            raise UnsupportedByBackendError(name, provider, "compress weights when exporting (--weight-format)")
        raise InvalidRequestError(f"unknown option {name!r} for the openvino backend", param=name)
    if dtype not in PRECISIONS:
        raise InvalidRequestError(f"must be one of {', '.join(PRECISIONS)}", param="dtype")
    core = ov.Core()
    if device.upper() not in core.available_devices:
        raise UnsupportedByBackendError("device", provider, f"OpenVINO sees {', '.join(core.available_devices)}")
    folder = Path(target).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelFileError(folder, f"is neither an OpenVINO export ({XML} + config.json) nor a Hugging Face folder")
    model_folder = folder if (folder / XML).is_file() else exported(folder, Path(cache_dir) if cache_dir else None)
    info, config, gen = hf_folder_info(model_folder)
    try:
        compiled = core.compile_model(model_folder / XML, device.upper(),
                                      {"INFERENCE_PRECISION_HINT": PRECISIONS[dtype]})
    except RuntimeError as e:
        raise ModelFileError(model_folder / XML, f"OpenVINO cannot compile it ({e})") from None
    if "logits" not in {name for port in compiled.outputs for name in port.get_names()} \
            or not compiled.create_infer_request().query_state():
        raise ModelFileError(model_folder / XML, "expected a causal LM export with a 'logits' output and its KV cache "
                                                 "as state (optimum-cli's default; not --disable-stateful)")
    text: dict = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    heads = int(text.get("num_attention_heads") or 1)
    kv = (int(text.get("num_key_value_heads") or heads),
          int(text.get("head_dim") or text.get("hidden_size", 0) // heads))
    return OpenVinoBackend(compiled, kv, info, name=folder.resolve().name, model_type=str(config.get("model_type")),
                           generation_config=gen, path=model_folder, format="openvino",
                           dtype={"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[PRECISIONS[dtype]])
