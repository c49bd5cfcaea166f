"""KV cache: an explicit object owned by the generation loop, not hidden in the model.

Static and preallocated ([B, n_kv, capacity, head_dim] per layer), so decode never reallocates;
it grows (doubling, up to `max_capacity`) only when a caller asks for more than it holds.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def positions(self, n: int) -> torch.Tensor:
        """[1, n]: the positions of the next n tokens (the same for every row)."""
        return torch.arange(self.offset, self.offset + n, device=self.device)[None]

    def span(self, n: int) -> Aligned:
        return Aligned(self.offset, self.positions(n))

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


@dataclass(frozen=True)
class Aligned:
    """Where a pass's S new tokens sit when every row is at the same length (a KVCache, or no
    cache: offset 0): positions offset..offset+S-1."""
    offset: int
    positions: torch.Tensor  # [1, S]


@dataclass(frozen=True)
class Ragged:
    """Where a pass's S new tokens sit when each row is at its own length (a SlotCache): per-row
    positions, which are also the query positions the attention mask is built from."""
    positions: torch.Tensor  # [B, S]


@dataclass(frozen=True)
class Step:
    """What every layer of one forward pass takes besides the hidden states and the rotary tables:
    the cache it writes its keys/values into (None: none) and where the new tokens sit."""
    cache: KVCache | SlotCache | None
    span: Aligned | Ragged

    @staticmethod
    def of(cache: KVCache | SlotCache | None, n: int, device: torch.device) -> Step:
        """The step of a pass over n new tokens after what `cache` holds."""
        span = Aligned(0, torch.arange(n, device=device)[None]) if cache is None else cache.span(n)
        return Step(cache, span)


class SlotCache:
    """KV cache for continuous batching: up to `slots` sequences, each at its own length, in one
    preallocated [slots, n_kv, capacity, head_dim] tensor per layer. The rows in use are packed at
    the front (0..n-1), so a step's keys are a view; a leaving row's slot takes the last row."""

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (slots, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots, self.capacity, self.device = slots, capacity, torch.device(device)
        self.lens = torch.zeros(slots, dtype=torch.long)
        self.n = 0  # rows in use
        self.tag: object = "default"
        # rows n.. keep what finished requests left: the token ids whose keys/values they still
        # hold, for a later prompt that starts the same way (a prompt cache across requests)
        self.kept: list[list[int] | None] = [None] * slots
        self._kept_at = [0] * slots  # when (a counter), for add_row to overwrite the oldest
        self._clock = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def positions(self, n: int) -> torch.Tensor:
        return (self.lens[: self.n, None] + torch.arange(n)).to(self.device)

    def span(self, n: int) -> Ragged:
        return Ragged(self.positions(n))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = k.shape[2]
        pos = self.positions(S)
        rows = torch.arange(self.n, device=self.device)[:, None].expand(-1, S)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = int(self.lens[: self.n].max()) + S
        return self.k[layer][: self.n, :, :end], self.v[layer][: self.n, :, :end]

    def advance(self, n: int) -> None:
        self.lens[: self.n] += n

    def add_row(self) -> int:
        """Take a free row (row n). What it kept moves to the free row that kept nothing or the
        oldest thing, so the most recently kept prefixes survive."""
        if self.n >= self.slots:
            raise RuntimeError("no free slot")
        n = self.n
        kept = self.kept[n]
        if kept:
            victim = min(range(n, self.slots), key=lambda r: (self.kept[r] is not None, self._kept_at[r]))
            if victim != n:
                end = len(kept)
                for t in self.k + self.v:
                    t[victim, :, :end] = t[n, :, :end]
                self.kept[victim], self._kept_at[victim] = self.kept[n], self._kept_at[n]
        self.lens[n] = 0
        self.kept[n] = None
        self.n += 1
        return n

    def remove_row(self, i: int, keep: list[int] | None = None) -> None:
        """Free row i: the last row moves into it (callers renumber that one). With `keep` (the
        token ids of row i's first len(keep) positions) row i's keys/values are kept, swapped to
        the first free row, for prefix(); else they are dropped."""
        last = self.n - 1
        if i != last:
            end, mine = int(self.lens[last]), int(self.lens[i])
            for t in self.k + self.v:
                saved = t[i, :, :mine].clone() if keep else None
                t[i, :, :end] = t[last, :, :end]
                if saved is not None:
                    t[last, :, :mine] = saved
            self.lens[i] = self.lens[last]
        self.kept[last] = list(keep) if keep else None
        self._clock += 1
        self._kept_at[last] = self._clock
        self.n -= 1

    def prefix(self, prompt: list[int]) -> tuple[int, int]:
        """(row, n): the free row whose kept tokens share the longest prefix with `prompt`, and
        that prefix's length (0 when none does)."""
        best, best_n = -1, 0
        for row in range(self.n, self.slots):
            kept = self.kept[row]
            if not kept:
                continue
            n = 0
            for a, b in zip(kept, prompt):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = row, n
        return best, best_n

    def copy_prefix(self, row: int, n: int, dst: KVCache) -> None:
        """The first n positions of free row `row` into a one-row KVCache (which then holds n)."""
        dst.reserve(n)
        for src, d in zip(self.k + self.v, dst.k + dst.v):
            d[0, :, :n] = src[row, :, :n]
        dst.offset = n

    def load_row(self, i: int, src: KVCache, n: int) -> None:
        """Row i holds the first n positions of a one-row KVCache (a prompt prefilled on its own)."""
        for d, t in zip(self.k + self.v, src.k + src.v):
            d[i, :, :n] = t[0, :, :n]
        self.lens[i] = n

    def row_cache(self, i: int) -> KVCache:
        """Row i as a one-row KVCache over the same memory (prefill writes straight into the slot)."""
        c = KVCache.__new__(KVCache)
        c.n_layers, c.batch_size, c.n_kv_heads, c.head_dim = len(self.k), 1, self.k[0].shape[1], self.k[0].shape[3]
        c.max_capacity = c.capacity = self.capacity
        c.dtype, c.device = self.k[0].dtype, self.device
        c.offset, c.tag = int(self.lens[i]), "default"
        c.k, c.v = [t[i:i + 1] for t in self.k], [t[i:i + 1] for t in self.v]
        return c
