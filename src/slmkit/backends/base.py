"""The interface every backend implements: token ids in, token ids out."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..engine.tokenizer import Tokenizer


@dataclass
class SamplingOptions:
    max_new_tokens: int | None = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False


@dataclass
class TokenStep:
    token_id: int
    finish_reason: str | None = None  # "stop" or "length" on the last step


class Backend(Protocol):
    name: str
    model_type: str
    tokenizer: Tokenizer
    context_length: int
    vocab_size: int
    supports_images: bool

    def stream_tokens(self, prompt_ids: Sequence[int], options: SamplingOptions) -> Iterator[TokenStep]: ...

    def logits(self, ids: Sequence[int]) -> torch.Tensor: ...
