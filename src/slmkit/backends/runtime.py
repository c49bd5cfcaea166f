"""A base for local runtimes behind the token-level boundary (transformers, ONNX Runtime GenAI,
llama.cpp, OpenVINO, MLX, QNN): the runtime computes logits; everything else is ours, as for the
native engine: the tokenizer and chat template (from the model folder or GGUF file), the stop ids,
and the step-by-step Generator's processors, grammar and sampler over those logits. So every
GenerationOption means the same on every runtime, and greedy runs differ only where the runtimes'
logits do.

A subclass implements reset() / prefill(ids) / step(token) (logits of the last position, float32
[vocab]) and, if it can, full_logits(ids); its module's open(provider, target, **options) builds it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.engine import stop_token_ids, validate_token_ids
from ..engine.generator import Generator, GeneratorParams
from ..errors import ConfigError, ModelFileError, UnsupportedByBackendError
from ..options import GenerationOptions
from .base import BackendStats, Capabilities, ModelDescription, SearchResult, Session, TokenStep


@dataclasses.dataclass
class ModelInfo:
    """What the Generator needs of a model whose logits come from elsewhere (a LogitsSource)."""
    tokenizer: Any
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    device: str = "cpu"

    def check_prompt_ids(self, ids: object, images: Mapping[int, Any] | None, what: str) -> list[int]:
        if images:
            raise UnsupportedByBackendError("images", "this runtime")
        return validate_token_ids(ids, self.vocab_size, what)


def hf_folder_info(folder: Path) -> tuple[ModelInfo, dict, dict]:
    """(ModelInfo, config.json, generation_config.json) of a Hugging Face folder, with our tokenizer."""
    from ..loading.files import read_json
    from ..text.tokenizer import Tokenizer

    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelFileError(folder / "config.json", "must hold a JSON object")
    gen = read_json(folder / "generation_config.json", required=False)
    gen = gen if isinstance(gen, dict) else {}
    text: dict = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    sizes = []
    for name, default in (("vocab_size", None), ("max_position_embeddings", 4096)):
        v = text.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(name, f"must be a positive integer, got {v!r}", path=folder / "config.json")
        sizes.append(v)
    vocab, ctx = sizes
    tok = Tokenizer.from_folder(folder)
    return ModelInfo(tok, ctx, vocab, stop_token_ids(tok, gen, text.get("eos_token_id"), vocab)), config, gen


class RuntimeBackend:
    """Token ids in, token ids out, over another runtime's logits. Subclasses set `provider`."""
    provider = "runtime"
    has_full_logits = False  # full_logits(ids) implemented

    def __init__(self, info: ModelInfo, *, name: str, model_type: str, generation_config: dict | None = None,
                 path: Path | None = None, format: str = "", dtype: str = ""):
        self.info = info
        self.tokenizer = info.tokenizer
        self.name, self.model_type, self.path = name, model_type, path
        self.context_length, self.vocab_size = info.context_length, info.vocab_size
        self.generation_config = generation_config or {}
        self.tokens_generated = 0
        self._format, self._dtype = format, dtype
        self.capabilities = Capabilities(logits=self.has_full_logits, structured_output=True, logprobs=True,
                                         backend=self.provider)

    # ------------------------------------------------------------------ what a subclass implements
    def reset(self) -> None:
        """Forget the previous sequence (its KV cache)."""
        raise NotImplementedError

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Run a whole prompt from an empty cache: float32 logits [vocab] of its last position."""
        raise NotImplementedError

    def step(self, token: int) -> torch.Tensor:
        """Run one more token: float32 logits [vocab] of it."""
        raise NotImplementedError

    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        raise UnsupportedByBackendError("logits", self.provider)

    # ------------------------------------------------------------------ the Backend protocol
    def params(self, options: GenerationOptions) -> GeneratorParams:
        return GeneratorParams.for_request(options, self.generation_config)

    def stream_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions, session: Session | None = None,
                      images: Any = None) -> Iterator[TokenStep]:
        if images is not None:
            raise UnsupportedByBackendError("images", self.provider)
        gen = Generator(self.info, self.params(options), external_logits=True)
        gen.append_tokens(list(prompt_ids))  # checks ids and length before the runtime sees them
        want = options.wants_logprobs
        self.reset()
        logits = self.prefill(list(prompt_ids))
        while True:
            gen.set_logits(logits.float().view(1, -1)[:, : self.vocab_size])
            gen.generate_next_token()
            token, reason = gen.get_next_tokens()[0], gen.finish_reasons[0]
            self.tokens_generated += 1
            step = TokenStep(token, reason)
            if want:
                lp = gen.last_logprobs[0]
                step.logprob, step.top_logprobs = lp[1], (lp[2] if options.top_logprobs else None)
            yield step
            if gen.is_done():
                return
            logits = self.step(token)

    def logits(self, ids: Sequence[int], images: Any = None) -> Any:
        if images is not None:
            raise UnsupportedByBackendError("images", self.provider)
        return self.full_logits(validate_token_ids(ids, self.vocab_size, "input_ids"))

    def new_session(self) -> Session:
        return Session()

    def beam_search(self, prompt_ids: Sequence[int], options: GenerationOptions) -> list[SearchResult]:
        raise UnsupportedByBackendError("num_beams", self.provider)

    def enable_batching(self, slots: int, context: int | None) -> None:
        raise UnsupportedByBackendError("batching", self.provider)

    def enable_prompt_cache(self, on: bool = True) -> None:
        if on:
            raise UnsupportedByBackendError("prompt_cache", self.provider)

    def describe(self) -> ModelDescription:
        return ModelDescription(model_type=self.model_type, context_length=self.context_length, format=self._format,
                                dtype=self._dtype, chat_template=self.tokenizer.chat_template or "")

    def stats(self) -> BackendStats:
        return BackendStats(self.tokens_generated, request_context=self.context_length)

    def close(self) -> None:
        self.reset()

