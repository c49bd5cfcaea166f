"""KV cache: an explicit object owned by the generation loop, not hidden in the model.

Static and preallocated ([B, n_kv, capacity, head_dim] per layer), so decode never reallocates;
it grows (doubling, up to `max_capacity`) only when a caller asks for more than it holds.
"""
from __future__ import annotations

import torch

from ..errors import ContextLengthError


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        max_capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.n_layers, self.batch_size = n_layers, batch_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.max_capacity = max_capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.offset = 0  # tokens stored so far (the same for every row)
        self.tag: object = None  # what the stored keys were computed with (e.g. the LongRoPE regime)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.reserve(min(capacity, max_capacity))

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (self.batch_size, self.n_kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, needed: int) -> None:
        """Make room for `needed` tokens in all (grow by doubling, never past max_capacity)."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise ContextLengthError(needed, self.max_capacity)
        new_cap = min(self.max_capacity, max(needed, 2 * self.capacity, 16))
        new_k = [self._alloc(new_cap) for _ in range(self.n_layers)]
        new_v = [self._alloc(new_cap) for _ in range(self.n_layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.offset].copy_(old[:, :, : self.offset])
        self.k, self.v, self.capacity = new_k, new_v, new_cap

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, n_kv, S, D] for positions offset..offset+S-1 -> all keys/values [B, n_kv, offset+S, D]
        end = self.offset + k.shape[2]
        self.k[layer][:, :, self.offset : end] = k
        self.v[layer][:, :, self.offset : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its `n` new positions."""
        self.offset += n

    def trim(self, n: int) -> int:
        """Drop the last `n` tokens; returns how many were dropped."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        if self.offset == 0:
            self.tag = None
        return n

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes what row rows[i] was (beam search follows its surviving beams)."""
        for t in self.k + self.v:
            t[:, :, : self.offset] = t[rows, :, : self.offset]

    def reset(self) -> None:
        self.offset = 0
        self.tag = None
