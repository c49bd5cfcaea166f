"""Shared by the fused decode step tests (tests/models/test_*_fused.py): greedy decoding through a
model's forward, and a record of what each call of a fused step did."""
from __future__ import annotations

import torch

from slmkit.kernels import fused
from slmkit.models.cache import KVCache


def new_cache(model, dtype: torch.dtype, capacity: int = 64) -> KVCache:
    a = model.args
    return KVCache(a.num_hidden_layers, 1, a.num_key_value_heads, a.head_dim, capacity, max_capacity=capacity,
                   dtype=dtype)


def decode(model, prompt: list[int], new: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    """Greedy: prefill, then `new` one-token steps through model.forward; (tokens, logits [new, V])."""
    cache = new_cache(model, dtype)
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
        for i in range(new):
            logits.append(out.float())
            tokens.append(int(out.argmax()))
            if i + 1 < new:
                out = model(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    return tokens, torch.stack(logits)


def spying(monkeypatch, step: str) -> list[tuple[int, bool]]:
    """(new tokens, whether it ran) of every call of fused.<step> (gemma3_decode, phi3_decode)."""
    seen: list[tuple[int, bool]] = []
    real = getattr(fused, step)

    def spy(plan, h, *args, **kwargs):
        out = real(plan, h, *args, **kwargs)
        seen.append((h.shape[1], out is not None))
        return out

    monkeypatch.setattr(fused, step, spy)
    return seen
