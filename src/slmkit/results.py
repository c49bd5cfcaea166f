"""What generation returns: results, stream chunks, token log-probabilities, usage and timings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    prefill_s: float = 0.0  # prompt processing up to the first token
    decode_s: float = 0.0  # every later token

    def decode_tokens_per_s(self, completion_tokens: int) -> float:
        return (completion_tokens - 1) / self.decode_s if completion_tokens > 1 and self.decode_s > 0 else 0.0

    def prefill_tokens_per_s(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class TokenRouting:
    """A mixture-of-experts model's choices for one generated token: per layer, the expert ids and
    their weights (Phi-3.5-MoE: 2 each, weights not renormalised) at the position whose output
    chose the token (the prompt's last position for the first token)."""
    experts: list[list[int]]  # [layer][k]
    weights: list[list[float]]  # [layer][k]


@dataclass
class TokenLogprob:
    """A generated token with the model's log-probability of it (before penalties and sampling
    filters), and the most likely alternatives at that step when top_logprobs was asked for."""
    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos / stop string) or "length"
    usage: Usage
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # one per token id, with logprobs=True / top_logprobs=N
    tool_calls: list[Any] | None = None  # slmkit.tools.ToolCall list when the answer called a tool
    score: float | None = None  # a beam's length-normalised log-probability (num_beams > 1)
    routing: list[TokenRouting] | None = None  # one per token id, with return_routing=True (MoE models)


@dataclass
class GenerationChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the last chunk, which also carries usage and timings
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[Any] | None = None  # on the last chunk of chat(stream=True, tools=...) that called a tool
    routing: list[TokenRouting] | None = None  # with return_routing=True: one per token id of this chunk


def routing_of(step: Any) -> list[TokenRouting] | None:
    """A token step's routing as a chunk's list (one per token), or None when not asked for."""
    r = getattr(step, "routing", None)
    return None if r is None else [r]
