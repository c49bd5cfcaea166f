"""The interface every backend implements: token ids in, token ids out."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..text.tokenizer import Tokenizer


@dataclass
class SamplingOptions:
    max_new_tokens: int | None = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    # the rest of the decoding knobs, named and defaulted as in engine.generator.GeneratorParams
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    repetition_window: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] | None = None
    min_new_tokens: int = 0
    scorers: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=tuple)
    logprobs: bool = False  # report the chosen token's log-probability per step
    top_logprobs: int = 0  # ... and this many alternatives (0-20)
    json_schema: dict | str | None = None  # structured output: at most one of these four
    regex: str | None = None
    grammar: str | None = None
    response_format: dict | None = None
    max_length: int | None = None  # prompt + generated tokens (Ollama's num_ctx); default: the context

EXTRA_OPTIONS = ("min_p", "typical_p", "repetition_penalty", "repetition_window", "presence_penalty",
                 "frequency_penalty", "no_repeat_ngram_size", "logit_bias", "min_new_tokens", "scorers",
                 "logprobs", "top_logprobs", "json_schema", "regex", "grammar", "response_format", "max_length")


@dataclass
class TokenStep:
    token_id: int
    finish_reason: str | None = None  # "stop" or "length" on the last step
    logprob: float | None = None  # the model's log-probability of token_id (when asked for)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely ids and their log-probabilities


class Backend(Protocol):
    name: str
    model_type: str
    tokenizer: Tokenizer
    context_length: int
    vocab_size: int
    supports_images: bool

    def stream_tokens(self, prompt_ids: Sequence[int], options: SamplingOptions,
                      session: dict | None = None) -> Iterator[TokenStep]:
        """session: a dict the backend may keep state in between calls (the native backend keeps
        its Generator and KV cache there); backends without such reuse ignore it."""
        ...

    def logits(self, ids: Sequence[int]) -> torch.Tensor: ...
