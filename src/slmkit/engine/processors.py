"""Logits processors: small pure functions over float32 logits [B, V], composed in a fixed order.

Semantics follow the reference each knob comes from, so results match it exactly:
- repetition_penalty: transformers / ONNX Runtime GenAI (a seen token's logit is divided by the
  penalty when positive, multiplied when negative), over the whole sequence or the last
  `repetition_window` tokens;
- presence_penalty / frequency_penalty: OpenAI (logit -= presence * [count > 0] + frequency * count),
  over the generated tokens;
- no_repeat_ngram_size, min_new_tokens, temperature, top_k, top_p, min_p, typical_p: transformers'
  LogitsProcessor / LogitsWarper of the same name (at least one token always survives);
- logit_bias: OpenAI ({token id: bias} added to the logits).

Order: penalties, logit_bias, no-repeat n-grams, min_new_tokens, the user's scorers, then the
warpers temperature, top_k, top_p, min_p, typical_p (transformers' order).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids [B, S], logits [B, V]) -> logits


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """ids [B, S] (the window already cut)."""
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    score = logits.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, ids, score)


def apply_presence_frequency(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """generated [B, G]: the tokens produced so far (not the prompt), as OpenAI counts them."""
    if (presence == 0 and frequency == 0) or generated.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    idx = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    val = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, idx, val.expand(logits.shape[0], -1))


def banned_ngram_tokens(seq: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in seq (transformers' rule)."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]


def apply_no_repeat_ngram(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return logits
    out = logits.clone()
    for b, row in enumerate(ids.tolist()):
        banned = banned_ngram_tokens(row, n)
        if banned:
            out[b, banned] = NEG_INF
    return out


def apply_min_new_tokens(logits: torch.Tensor, produced: int, min_new: int, eos_ids: Sequence[int]) -> torch.Tensor:
    if produced >= min_new or not eos_ids:
        return logits
    out = logits.clone()
    out[:, list(eos_ids)] = NEG_INF
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= p  # mass before this token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p x the top token's."""
    if p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    ent = -(torch.nan_to_num(logp * p)).sum(dim=-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_shift, order = torch.sort(shifted, dim=-1)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drop = sorted_shift > sorted_shift.gather(1, last)
    return logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def process(logits: torch.Tensor, params: object, sequences: Sequence[Sequence[int]], prompt_len: int,
            eos_ids: Sequence[int], mask: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The whole chain of a GeneratorParams-like `params` over logits [B, V] (before sampling).
    sequences: every row's tokens so far; prompt_len: where the generated tokens start; mask: a
    grammar's token mask, applied after the scorers and before the warpers (so they never remove
    every allowed token)."""
    p = params
    x = logits
    needs_ids = (p.repetition_penalty != 1.0 or p.no_repeat_ngram_size > 0 or p.presence_penalty != 0
                 or p.frequency_penalty != 0 or p.scorers)
    ids = torch.tensor(sequences, dtype=torch.long, device=x.device) if needs_ids else None
    if p.repetition_penalty != 1.0:
        window = ids[:, -p.repetition_window:] if p.repetition_window else ids
        x = apply_repetition_penalty(x, window, p.repetition_penalty)
    if p.presence_penalty != 0 or p.frequency_penalty != 0:
        x = apply_presence_frequency(x, ids[:, prompt_len:], p.presence_penalty, p.frequency_penalty)
    if p.logit_bias:
        x = apply_logit_bias(x, p.logit_bias)
    if p.no_repeat_ngram_size:
        x = apply_no_repeat_ngram(x, ids, p.no_repeat_ngram_size)
    produced = len(sequences[0]) - prompt_len
    min_new = max(p.min_new_tokens, p.min_length - prompt_len)
    if min_new > 0:
        x = apply_min_new_tokens(x, produced, min_new, eos_ids)
    for scorer in p.scorers:
        x = scorer(ids, x)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(logits.shape):
            from ..errors import InvalidRequestError

            raise InvalidRequestError(f"a scorer must return logits of shape {tuple(logits.shape)}", param="scorers")
    if mask is not None:
        x = mask(x)
    if p.temperature <= 0:  # greedy: the warpers cannot change the argmax
        return x
    x = x / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        # the later filters only see what top-k kept: run them on the k survivors (same result as on
        # the -inf-filled row, without sorting the whole vocabulary)
        vals, idx = torch.topk(x, p.top_k, dim=-1)
        vals = apply_typical_p(apply_min_p(apply_top_p(vals, p.top_p), p.min_p), p.typical_p)
        return torch.full_like(x, NEG_INF).scatter_(1, idx, vals)
    x = apply_top_p(x, p.top_p)
    x = apply_min_p(x, p.min_p)
    return apply_typical_p(x, p.typical_p)
