"""`llamacpp:./x.gguf`: llama.cpp (through llama-cpp-python) runs the model and gives the logits of
the last token of each eval; our GGUF tokenizer, chat template, stop ids and sampler
(backends/runtime.py) do the rest, so templates, stop ids and every option mean what they mean on the
native engine reading the same file.

open() options: n_ctx (default: the model's context length, at most 8192 so that a 128k model does
not reserve a 128k KV cache; pass n_ctx to go further), n_threads (llama.cpp's default: half the
cores), n_batch (prompt tokens per decode call), logits_all=True (keeps every position's logits,
n_ctx x vocab floats, so that LLM.logits(ids) works; off by default: not cheap on a real model).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailableError, InvalidRequestError, ModelFileError
from .runtime import ModelInfo, RuntimeBackend

DEFAULT_MAX_CTX = 8192


class LlamaCppBackend(RuntimeBackend):
    provider = "llamacpp"

    def __init__(self, llama: Any, *args: Any, logits_all: bool = False, **kw: Any):
        self.has_full_logits = logits_all  # before the base builds capabilities from it
        super().__init__(*args, **kw)
        self.llama = llama

    def reset(self) -> None:
        self.llama.reset()  # n_tokens = 0: the next eval drops the KV cache from position 0

    def _eval(self, ids: Sequence[int]) -> torch.Tensor:
        import llama_cpp

        self.llama.eval(list(ids))  # llama.cpp keeps the last position's logits (all of them with logits_all)
        row = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.vocab_size,)).copy())

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self.reset()
        return self._eval(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._eval([token])

    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        if not self.has_full_logits:
            return super().full_logits(ids)
        if len(ids) > self.context_length:
            raise InvalidRequestError(f"has {len(ids)} tokens, over n_ctx {self.context_length}", param="input_ids")
        self.reset()
        self.llama.eval(list(ids))
        return torch.from_numpy(np.array(self.llama.scores[: len(ids)], dtype=np.float32))

    def close(self) -> None:
        close = getattr(self.llama, "close", None)
        if close is not None:
            close()


def _model_info(path: Path, n_ctx: int | None) -> tuple[ModelInfo, str, str]:
    """(ModelInfo with our tokenizer for the file, architecture, name) from the GGUF metadata."""
    from ..engine.engine import stop_token_ids
    from ..gguf import open_gguf
    from ..loading.gguf import _eos_ids
    from ..text.gguf_tokenizer import tokenizer_from_gguf_metadata

    f = open_gguf(path)
    try:  # any architecture llama.cpp runs: only the tokenizer and sizes are read here
        arch = f.architecture
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFileError(path, "has no token_embd.weight tensor")
        vocab = embd.shape[0]
        tok = tokenizer_from_gguf_metadata(f.metadata)
        eos = stop_token_ids(tok, {"eos_token_id": _eos_ids(f.metadata, vocab)}, None, vocab)
        model_ctx = f.metadata.get(f"{arch}.context_length", 4096)
        if isinstance(model_ctx, bool) or not isinstance(model_ctx, int) or model_ctx < 1:
            raise ModelFileError(path, f"{arch}.context_length must be a positive integer, got {model_ctx!r}")
        name = str(f.metadata.get("general.name") or path.stem)
    finally:
        f.close()
    ctx = n_ctx if n_ctx is not None else min(model_ctx, DEFAULT_MAX_CTX)
    return ModelInfo(tok, ctx, vocab, eos), arch, name


def _check_options(n_ctx: Any, n_threads: Any, n_batch: Any, dtype: str, device: str,
                   options: dict[str, Any]) -> None:
    if options:
        name = next(iter(options))
        raise InvalidRequestError(f"unknown option {name!r} for the llamacpp backend (it takes n_ctx, n_threads, "
                                  "n_batch, logits_all)", param=name)
    for name, v in (("n_ctx", n_ctx), ("n_threads", n_threads), ("n_batch", n_batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidRequestError(f"must be a positive integer, got {v!r}", param=name)
    if dtype not in ("auto", "float32"):  # llama.cpp computes in float32 over the file's own tensor types
        raise InvalidRequestError(f"llama.cpp computes in the GGUF file's types; got {dtype!r} (use auto)",
                                  param="dtype")
    if device != "cpu":
        raise InvalidRequestError(f"the llamacpp backend runs on cpu here, got {device!r}", param="device")


def open(provider: str, target: str, *, n_ctx: int | None = None, n_threads: int | None = None,  # noqa: A001
         n_batch: int = 512, logits_all: bool = False, dtype: str = "auto", device: str = "cpu",
         **options: Any) -> LlamaCppBackend:
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs llama-cpp-python ({e})", extra="llamacpp") from None
    _check_options(n_ctx, n_threads, n_batch, dtype, device, options)
    path = Path(target).expanduser()
    if not path.is_file():
        raise ModelFileError(path, "is not a GGUF file (llamacpp: takes a path to a .gguf file)")
    info, arch, name = _model_info(path, n_ctx)
    try:
        llama = llama_cpp.Llama(model_path=str(path), n_ctx=info.context_length, n_threads=n_threads,
                                n_batch=min(n_batch, info.context_length), logits_all=bool(logits_all),
                                verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(path, f"llama.cpp cannot load it ({e})") from None
    if llama.n_vocab() != info.vocab_size:
        raise ModelFileError(path, f"llama.cpp reads {llama.n_vocab()} tokens, the file's embedding has "
                             f"{info.vocab_size}")
    return LlamaCppBackend(llama, info, name=name, model_type=arch, path=path, format="gguf",
                           logits_all=bool(logits_all))
