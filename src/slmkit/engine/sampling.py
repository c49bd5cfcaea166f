"""Sampling from float32 logits [B, V] (temperature 0 means argmax); the filters live in processors.py."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InvalidRequestError
from ..kernels import fused
from .processors import apply_top_k, apply_top_p

__all__ = ["apply_top_k", "apply_top_p", "draw", "finite_choice", "greedy", "make_sampler", "sample"]


def finite_choice(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] a sampler can always use. Extreme options (a repetition_penalty of 1e-45
    divides a logit into +inf), a scorer or a broken model can leave NaN or +inf, which make the
    softmax NaN and torch.multinomial raise. NaN counts as -inf (no candidate); where a row has
    +inf entries they share all its probability (the softmax's limit as those logits grow); a row
    with no candidate left is a request error, not token 0."""
    if bool(torch.isfinite(logits.amax(dim=-1)).all()):
        return logits  # the usual case, one reduction per step: each row's max (NaN spreads to it) is finite
    x = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if not bool((x > float("-inf")).any(dim=-1).all()):
        raise InvalidRequestError("no token can be chosen: every logit is -inf or NaN after the decoding options "
                                  "(logit_bias, penalties, scorers, a grammar) or the model's output")
    top = x == float("inf")
    if bool(top.any()):
        rows = top.any(dim=-1, keepdim=True)
        x = torch.where(rows, torch.zeros_like(x).masked_fill(~top, float("-inf")), x)
    return x


def greedy(logits: torch.Tensor) -> torch.Tensor:
    # the usual case in one pass and one thread: every row free of NaN with a finite largest, the
    # index torch's argmax gives (its argmax and finite_choice's amax: ~0.25 ms over 262144 logits)
    ids = fused.argmax(logits)
    return finite_choice(logits).argmax(dim=-1) if ids is None else ids


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] from already processed logits [B, V]: argmax when temperature is 0, else a
    draw from their softmax (the temperature was applied by the processor chain)."""
    if temperature <= 0:
        return greedy(logits)
    return torch.multinomial(finite_choice(logits).softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_sampler(temperature: float) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """The draw of one request, chosen once (mlx-lm's make_sampler): argmax at temperature 0, else a
    draw from the processed logits' softmax."""
    def argmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return greedy(logits)

    def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(finite_choice(logits).softmax(dim=-1), 1, generator=generator).squeeze(-1)

    return argmax if temperature <= 0 else draw


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    if temperature <= 0:
        return greedy(logits)
    return draw(apply_top_p(apply_top_k(logits / temperature, top_k), top_p), temperature, generator)
