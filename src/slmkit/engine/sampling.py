"""Sampling from float32 logits [B, V] (temperature 0 means argmax); the filters live in processors.py."""
from __future__ import annotations

import torch

from .processors import apply_top_k, apply_top_p

__all__ = ["apply_top_k", "apply_top_p", "draw", "greedy", "sample"]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] from already processed logits [B, V]: argmax when temperature is 0, else a
    draw from their softmax (the temperature was applied by the processor chain)."""
    if temperature <= 0:
        return greedy(logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    if temperature <= 0:
        return greedy(logits)
    return draw(apply_top_p(apply_top_k(logits / temperature, top_k), top_p), temperature, generator)
