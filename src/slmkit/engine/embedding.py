"""Text embeddings: mean-pooled, L2-normalised final hidden states.

For each text: run its token ids through the model (no cache), take the hidden states after the
final norm (what lm_head reads; models' forward(..., hidden=True)), average them over the text's
own tokens, and scale the average to unit L2 norm. The result is float32 [n, hidden].

Batching: texts are sorted by length and run in right-padded batches of at most
MAX_BATCH_TOKENS padded tokens. Right padding needs no attention mask: attention is causal, so a
real token (at a position before every pad) never sees a pad, and its hidden state is the one it
has alone; the pads' states are left out of the mean. A LongRoPE model picks its frequency set by
the longest position of a pass, so rows on either side of the switch run in separate batches.
Measured on this CPU (2 shared cores; builtin Gemma 3 270M in bfloat16, 32 random texts of 6-60
tokens, after a warm-up): padded sorted batches 6.7 s, one pass per text 36 s, one batch per
distinct length 33 s; the padded result equalled one-at-a-time exactly (max difference 0.0).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

MAX_BATCH_TOKENS = 8192  # padded tokens in one forward pass: bounds the activations' memory


def mean_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] (rows right-padded), lengths [B] -> the unit-norm mean of each row's first
    lengths[b] states, float32 [B, H]."""
    S = hidden.shape[1]
    mask = (torch.arange(S, device=hidden.device)[None, :] < lengths[:, None]).to(torch.float32)  # [B, S]
    summed = (hidden.float() * mask[:, :, None]).sum(dim=1)  # [B, H]
    mean = summed / lengths.to(torch.float32)[:, None]
    return torch.nn.functional.normalize(mean, p=2.0, dim=-1)


def batches(lengths: Sequence[int], *, max_tokens: int = MAX_BATCH_TOKENS,
            split_at: int | None = None) -> Iterator[list[int]]:
    """Indices of the rows in batches, shortest first: each batch's rows x its longest row stays
    within max_tokens (a row longer than that runs alone), and no batch has rows on both sides of
    split_at (rows of length <= split_at, and longer ones)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest
        crosses = split_at is not None and group and lengths[group[0]] <= split_at < longest
        if group and (crosses or (len(group) + 1) * longest > max_tokens):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def embed_rows(rows: Sequence[Sequence[int]], hidden_states: Any, *, pad_id: int = 0,
               max_tokens: int = MAX_BATCH_TOKENS, split_at: int | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """rows: validated, non-empty token-id lists; hidden_states(ids [B, S]) -> [B, S, H] final-normed
    states of right-padded rows. Returns float32 [len(rows), H], in the rows' order."""
    lengths = [len(r) for r in rows]
    out: torch.Tensor | None = None
    for group in batches(lengths, max_tokens=max_tokens, split_at=split_at):
        S = max(lengths[i] for i in group)
        ids = torch.full((len(group), S), pad_id, dtype=torch.long, device=device)
        for b, i in enumerate(group):
            ids[b, : lengths[i]] = torch.tensor(rows[i], dtype=torch.long)
        lens = torch.tensor([lengths[i] for i in group], device=device)
        pooled = mean_pool(hidden_states(ids), lens)
        if out is None:
            out = torch.empty(len(rows), pooled.shape[1], dtype=torch.float32)
        out[group] = pooled.cpu()
    assert out is not None, "no rows to embed"
    return out
