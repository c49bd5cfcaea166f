"""`onnx:./folder`: ONNX Runtime GenAI runs a model folder made by its model builder
(genai_config.json, model.onnx, tokenizer.json):

    python -m onnxruntime_genai.models.builder -i ./hf_folder -o ./folder -p fp32 -e cpu

ORT GenAI computes the logits (one og.Generator per sequence: the prompt through append_tokens,
then each token our sampler picks appended back); our tokenizer (the folder's tokenizer.json and
chat template), stop ids and Generator do the rest (backends/runtime.py). The builder writes no
config.json: vocabulary, context and end ids come from genai_config.json, and its "search" section
gives the model's sampling defaults. backends/qnn.py opens the same folders on a QNN device.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..engine.engine import stop_token_ids
from ..errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    ModelFileError,
    UnsupportedByBackendError,
)
from .runtime import ModelInfo, RuntimeBackend

BUILDER = "python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32 -e cpu"


def import_og(provider: str, extra: str) -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs onnxruntime-genai ({e})", extra=extra) from None
    return og


def read_genai_config(folder: Path) -> tuple[ModelInfo, dict, dict]:
    """(ModelInfo, genai_config.json's "model", its "search") of an ORT GenAI folder, with our tokenizer."""
    from ..loading.files import read_json
    from ..text.tokenizer import Tokenizer

    path = folder / "genai_config.json"
    if not path.is_file():
        hint = " (a Hugging Face folder: convert it first with " + BUILDER + ")" if (folder / "config.json").is_file() \
            else ""
        raise ModelFileError(folder, f"is not an ONNX Runtime GenAI folder (no genai_config.json){hint}")
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError("model", "must be an object", path=path)
    search = data.get("search") if isinstance(data.get("search"), dict) else {}
    sizes = []
    for name in ("vocab_size", "context_length"):
        v = model.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model.{name}", f"must be a positive integer, got {v!r}", path=path)
        sizes.append(v)
    vocab, ctx = sizes
    tok = Tokenizer.from_folder(folder)
    return ModelInfo(tok, ctx, vocab, stop_token_ids(tok, {}, model.get("eos_token_id"), vocab)), model, search


class OnnxBackend(RuntimeBackend):
    """A RuntimeBackend over an og.Model. Each sequence is a fresh og.Generator (its KV cache)."""
    provider = "onnx"
    has_full_logits = True

    def __init__(self, og: Any, model: Any, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.og, self.model = og, model
        self._gen: Any = None

    def _generator(self, ids: Sequence[int]) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context_length, batch_size=1)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return gen

    def reset(self) -> None:
        self._gen = None

    def _last(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self._gen.get_logits(), dtype=np.float32).reshape(-1)[: self.vocab_size])

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self._gen = self._generator(ids)
        return self._last()

    def step(self, token: int) -> torch.Tensor:
        self._gen.append_tokens(np.asarray([token], dtype=np.int32))
        return self._last()

    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        # the decoder's "logits" output after one append of the whole prompt: [1, len(ids), vocab]
        out = np.array(self._generator(ids).get_output("logits"), dtype=np.float32)
        return torch.from_numpy(out.reshape(len(ids), -1))


B = TypeVar("B", bound=OnnxBackend)


def load(cls: type[B], og: Any, target: str, config: Any = None) -> B:
    """Open an ORT GenAI folder as cls; config(folder) -> og.Config picks execution providers (None: the
    folder's own genai_config.json)."""
    folder = Path(target).expanduser()
    info, model_cfg, search = read_genai_config(folder)
    try:
        model = og.Model(config(folder) if config else str(folder))
    except Exception as e:  # og raises plain RuntimeError / OrtException for a bad graph or missing file
        if config is not None and "execution provider" in str(e).lower():  # the chosen provider, not the folder
            raise BackendUnavailableError(cls.provider, f"ONNX Runtime GenAI: {e}".strip(), extra=cls.provider) \
                from None
        raise ModelFileError(folder, f"ONNX Runtime GenAI cannot load it ({type(e).__name__}: {e})") from None
    return cls(og, model, info, name=folder.resolve().name, model_type=str(model_cfg.get("type", "")),
               generation_config=search, path=folder, format="onnx")


def folder_dtype(folder: Path) -> str | None:
    """The activations' precision of an ORT GenAI folder, from its decoder graph's logits output
    (float32 / float16 / bfloat16; an int4 folder computes in float32); None when it cannot tell."""
    try:
        import onnx

        from ..loading.files import read_json

        name = read_json(folder / "genai_config.json")["model"]["decoder"]["filename"]
        graph = onnx.load(str(folder / name), load_external_data=False).graph
        elem = next(o.type.tensor_type.elem_type for o in graph.output if o.name == "logits")
    except Exception:  # noqa: BLE001 -- no onnx package, another layout: not known, so not checked
        return None
    return {1: "float32", 10: "float16", 16: "bfloat16"}.get(elem)


def check_options(provider: str, dtype: str = "auto", device: str = "cpu", target: str | None = None,
                  **options: Any) -> None:
    """load()'s dtype / device / quant are chosen when converting: dtype may only name the folder's own
    precision (so a golden test can ask for float32 and be told if it is not), the rest stay at defaults."""
    if dtype != "auto":
        have = folder_dtype(Path(target).expanduser()) if target is not None else None
        if have != dtype:
            raise UnsupportedByBackendError("dtype", provider, f"this folder computes in {have or 'its own precision'}"
                                            "; the precision is chosen when converting (builder -p)")
    if device != "cpu":
        raise UnsupportedByBackendError("device", provider, "the execution provider is chosen when converting (-e)")
    for name in options:
        if name in ("quant", "group_size"):
            raise UnsupportedByBackendError(name, provider, "quantize when converting (builder -p int4)")
        raise InvalidRequestError(f"unknown option {name!r} for the {provider} backend", param=name)


def open(provider: str, target: str, **options: Any) -> OnnxBackend:  # noqa: A001 -- registry contract
    og = import_og(provider, "onnx")
    check_options(provider, target=target, **options)
    return load(OnnxBackend, og, target)
