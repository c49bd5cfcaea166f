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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generator import GeneratorParams

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


Processor = Callable[[torch.Tensor, "StepContext"], torch.Tensor]


class StepContext:
    """What a step's processors may read: every row's tokens (as a tensor only if one needs it),
    where the generated tokens start, and the end-of-sequence ids."""
    __slots__ = ("sequences", "prompt_len", "eos_ids", "ids")

    def __init__(self, sequences: Sequence[Sequence[int]], prompt_len: int, eos_ids: Sequence[int],
                 ids: torch.Tensor | None):
        self.sequences, self.prompt_len, self.eos_ids, self.ids = sequences, prompt_len, eos_ids, ids

    def tokens(self) -> torch.Tensor:
        """The rows' tokens [B, S]: built for the step whenever a processor that reads them is in the chain."""
        assert self.ids is not None, "make_logits_processors sets needs_ids for each processor that reads ids"
        return self.ids


def _scorer_step(scorer: Scorer) -> Processor:
    def step(x: torch.Tensor, c: StepContext) -> torch.Tensor:
        y = scorer(c.tokens(), x)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            from ..errors import InvalidRequestError

            raise InvalidRequestError(f"a scorer must return logits of shape {tuple(x.shape)}", param="scorers")
        return y
    return step


def make_logits_processors(p: GeneratorParams) -> tuple[list[Processor], bool]:
    """The processors a GeneratorParams-like `p` asks for, in order (penalties, logit_bias, no-repeat
    n-grams, min_new_tokens, scorers), built once per request as mlx-lm's make_logits_processors;
    and whether they need the token ids as a tensor."""
    steps: list[Processor] = []
    rp, window = p.repetition_penalty, p.repetition_window
    if rp != 1.0:
        steps.append(lambda x, c: apply_repetition_penalty(x, c.tokens()[:, -window:] if window else c.tokens(), rp))
    pres, freq = p.presence_penalty, p.frequency_penalty
    if pres != 0 or freq != 0:
        steps.append(lambda x, c: apply_presence_frequency(x, c.tokens()[:, c.prompt_len:], pres, freq))
    bias = dict(p.logit_bias) if p.logit_bias else None
    if bias:
        steps.append(lambda x, c: apply_logit_bias(x, bias))
    ngram = p.no_repeat_ngram_size
    if ngram:
        steps.append(lambda x, c: apply_no_repeat_ngram(x, c.tokens(), ngram))
    min_new_tokens, min_length = p.min_new_tokens, p.min_length
    if min_new_tokens > 0 or min_length > 0:
        def min_new(x: torch.Tensor, c: StepContext) -> torch.Tensor:
            need = max(min_new_tokens, min_length - c.prompt_len)
            return apply_min_new_tokens(x, len(c.sequences[0]) - c.prompt_len, need, c.eos_ids) if need > 0 else x
        steps.append(min_new)
    steps += [_scorer_step(f) for f in p.scorers]
    needs_ids = rp != 1.0 or bool(ngram) or pres != 0 or freq != 0 or bool(p.scorers)
    return steps, needs_ids


def make_warpers(p: GeneratorParams) -> Callable[[torch.Tensor], torch.Tensor]:
    """temperature, top_k, top_p, min_p, typical_p (transformers' order), built once per request;
    greedy (temperature 0) needs none: they cannot change the argmax."""
    t, k, top_p, min_p, typical = p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p
    if t <= 0:
        return lambda x: x

    def warp(x: torch.Tensor) -> torch.Tensor:
        x = x / t
        if 0 < k < x.shape[-1]:
            # the later filters only see what top-k kept: run them on the k survivors (same result as
            # on the -inf-filled row, without sorting the whole vocabulary)
            vals, idx = torch.topk(x, k, dim=-1)
            vals = apply_typical_p(apply_min_p(apply_top_p(vals, top_p), min_p), typical)
            return torch.full_like(x, NEG_INF).scatter_(1, idx, vals)
        return apply_typical_p(apply_min_p(apply_top_p(x, top_p), min_p), typical)
    return warp


class LogitsChain:
    """The whole chain of one request over logits [B, V] (before sampling), built once from its
    params: processors, then a grammar's token mask (after the scorers and before the warpers, so
    they never remove every allowed token), then the warpers."""

    def __init__(self, params: GeneratorParams):
        self.steps, self.needs_ids = make_logits_processors(params)
        self.warp = make_warpers(params)

    def __call__(self, logits: torch.Tensor, sequences: Sequence[Sequence[int]], prompt_len: int,
                 eos_ids: Sequence[int], mask: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        x = logits
        if self.steps:
            ids = torch.tensor(sequences, dtype=torch.long, device=x.device) if self.needs_ids else None
            if ids is not None and bool((ids < 0).any()):  # image tokens: no token of the vocabulary
                text = ids[0] >= 0  # every row holds the prompt's images at the same positions
                prompt_len -= int((~text[:prompt_len]).sum())
                ids = ids[:, text]
                sequences = ids.tolist()
            ctx = StepContext(sequences, prompt_len, eos_ids, ids)
            for step in self.steps:
                x = step(x, ctx)
        if mask is not None:
            x = mask(x)
        return self.warp(x)


def process(logits: torch.Tensor, params: GeneratorParams, sequences: Sequence[Sequence[int]], prompt_len: int,
            eos_ids: Sequence[int], mask: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The chain of a GeneratorParams-like `params` over logits [B, V], built for this one call
    (a Generator builds its LogitsChain once per request instead)."""
    return LogitsChain(params)(logits, sequences, prompt_len, eos_ids, mask)
