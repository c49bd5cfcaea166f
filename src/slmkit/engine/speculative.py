"""Speculative decoding: more than one token per pass over the weights.

A drafter proposes k tokens (prompt lookup: the tokens that followed the last occurrence of the
sequence's latest n-gram; or a smaller draft model with the same tokenizer), the target model
scores all of them in one forward pass (last_only=False), and they are accepted left to right:

- greedy: a drafted token is kept while it equals the argmax of the target's processed logits at
  its position; the first mismatch is replaced by that argmax, so the output is the plain
  decoding's, token for token;
- sampled: the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023):
  keep drafted token d with probability min(1, p(d) / q(d)), where p and q are the target's and
  the drafter's distributions after the same processors (for prompt lookup q is a point mass on d);
  on rejection draw from normalise(max(0, p - q)). The output follows p exactly.

After the pass the KV cache is trimmed back past the first rejected token. A verification never
straddles the LongRoPE crossover (the draft is cut where the frequency set would switch), so the
Generator's re-prefill there runs as in plain decoding.

"auto" uses prompt lookup when the prompt is at least AUTO_MIN_PROMPT tokens (input-grounded
tasks: summarise, rewrite, extract, edit code, where the answer repeats the prompt), or the draft
model when one is given; structured output and multi-row generators decode plainly under "auto"
(and refuse "ngram" / "draft" by name).

The continuous-batching engine (engine/batching.py) drafts for its rows with the same Speculator
(plan, then verify on the row's logits of its own batched pass); a row's draft model runs its
draft steps for that row alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidRequestError

if TYPE_CHECKING:
    from .generator import Generator

AUTO_MIN_PROMPT = 128  # prompt tokens from which "auto" drafts by prompt lookup
MAX_NGRAM, MIN_NGRAM = 3, 1  # the n-gram lengths prompt lookup tries, longest first
# tokens drafted after a one-token match: such drafts are mostly wrong, and a pass of k + 1 rows costs
# ~1 + 0.2 k plain steps (benchmarks/speculative.py); a longer match is found again once they are kept
UNIGRAM_DRAFT = 1
# a verified token and its logits [1, V] (its log-probability record is computed from them when read)
Verified = tuple[int, torch.Tensor]


def lookup_draft(seq: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens, trying n = max_ngram down to min_ngram (after a match of one token,
    at most UNIGRAM_DRAFT tokens); [] when none occurs. Image placeholders (negative ids) are never
    drafted."""
    if k <= 0 or len(seq) < 2:
        return []
    t = torch.tensor(seq, dtype=torch.long)
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        tail = t[-n:]
        windows = t[:-1].unfold(0, n, 1)  # windows starting before the tail's own start
        hits = (windows == tail).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            draft = seq[start:start + (k if n > 1 else min(k, UNIGRAM_DRAFT))]
            cut = next((i for i, x in enumerate(draft) if x < 0), len(draft))
            if cut:
                return draft[:cut]
    return []


def check_draft_model(target: Any, draft: Any) -> Any:
    """The draft model's Engine, after checking it can draft for target (an Engine): a locally
    loaded model whose tokenizer has the same vocabulary; InvalidRequestError(param="draft") else."""
    engine = getattr(draft, "engine", draft)  # an LLM (its .engine refuses non-native backends) or an Engine
    if not hasattr(engine, "forward") or not hasattr(engine, "tokenizer"):
        raise InvalidRequestError(f"must be a locally loaded model (slmkit.load), got {type(draft).__name__}",
                                  param="draft")
    if engine.vocab_size != target.vocab_size:
        raise InvalidRequestError(f"model {engine.name!r} has a vocabulary of {engine.vocab_size} tokens, the target "
                                  f"{target.name!r} {target.vocab_size}: the draft needs the same tokenizer",
                                  param="draft")
    if engine.tokenizer is not target.tokenizer and _vocab(engine.tokenizer) != _vocab(target.tokenizer):
        raise InvalidRequestError(f"model {engine.name!r} has another tokenizer than {target.name!r}: "
                                  "the draft needs the same one", param="draft")
    return engine


def _vocab(tokenizer: Any) -> dict[str, int]:
    backend = getattr(tokenizer, "backend", None)
    return dict(backend.get_vocab(with_added_tokens=True)) if backend is not None else {}


def mode_for(params: Any, prompt_len: int) -> str:
    """The drafting a request runs: "none", "ngram" or "draft" (params.speculative resolved)."""
    mode = params.speculative
    if mode == "auto":
        if params.batch_size != 1 or params._grammar is not None:
            return "none"
        if params.draft is not None:
            return "draft"
        return "ngram" if prompt_len >= AUTO_MIN_PROMPT else "none"
    if mode != "none":
        if params.batch_size != 1:
            raise InvalidRequestError(f"speculative={mode!r} decodes one row; batch_size is {params.batch_size}",
                                      param="speculative")
        if params._grammar is not None:
            raise InvalidRequestError(f"speculative={mode!r} cannot be combined with structured output "
                                      "(the grammar advances one token at a time)", param="speculative")
    return mode


class Speculator:
    """One request's drafter and verifier, driven by its Generator (generate_next_token)."""

    def __init__(self, gen: Generator, mode: str):
        self.mode, self.k = mode, gen.params.num_draft
        self.drafted = self.accepted = 0  # totals over the request, for usage
        self.draft_gen: Generator | None = None
        if mode == "draft":
            self._make_draft_generator(gen)

    def _make_draft_generator(self, gen: Generator) -> None:
        from dataclasses import replace

        from .generator import Generator as Gen

        engine = check_draft_model(gen.engine, gen.params.draft)
        seed = gen.params.seed
        params = replace(gen.params, speculative="none", draft=None, ignore_eos=True, max_new_tokens=None,
                         max_length=None, logprobs=False, top_logprobs=0, n=1,
                         seed=None if seed is None else (seed + 0x5EC) % 2**63)
        self.draft_gen = Gen(engine, params)  # built before the target's decode begins (configure)

    # ------------------------------------------------------------------ drafting
    def propose(self, gen: Generator, room: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to min(k, room) drafted tokens after gen's sequence, and (draft model) the draft's
        processed probabilities at each (None: point masses)."""
        seq = gen.sequences[0]
        k = min(self.k, room)
        if k <= 0:
            return [], None
        if self.mode == "ngram":
            return lookup_draft(seq, k), None
        d = self.draft_gen
        assert d is not None
        if any(t < 0 for t in seq) or len(seq) + k > d.max_length:
            return [], None  # images, or beyond the draft's context: a plain step
        old = d.sequences[0]
        common = next((i for i, (a, b) in enumerate(zip(old, seq)) if a != b), min(len(old), len(seq)))
        common = min(common, len(seq) - 1)
        d.rewind_to(common)
        d.append_tokens(seq[common:])
        d._prompt_len = gen._prompt_len  # the processors count generated tokens from the target's prompt
        drafts, probs = [], []
        greedy = gen.params.temperature <= 0
        for _ in range(k):
            d.generate_next_token()
            drafts.append(d.get_next_tokens()[0])
            if not greedy:
                assert d.last_processed is not None  # set by every plain step
                probs.append(d.last_processed[0].softmax(dim=-1))
        return drafts, (None if greedy else probs)

    # ------------------------------------------------------------------ verification
    def plan(self, gen: Generator, limit: int | None = None) -> tuple[list[int], list[torch.Tensor] | None]:
        """The drafts of the next verification pass over gen's sequence (and the draft model's
        probabilities): at most `limit` tokens, leaving room for the token after the last one
        within max_length / max_new_tokens, and never past the LongRoPE crossover."""
        seq, p = gen.sequences[0], gen.params
        length = len(seq)
        room = gen.max_length - length
        if p.max_new_tokens is not None:
            room = min(room, p.max_new_tokens - (length - gen._prompt_len))
        engine = gen.engine
        if engine.rope_crossover is not None and engine.rope_regime(length) == "short":
            room = min(room, engine.rope_crossover - length + 1)  # the pass stays on this side of it
        room -= 1  # room for the token after the last draft
        return self.propose(gen, room if limit is None else min(room, limit))

    def step(self, gen: Generator) -> list[Verified]:
        """One drafted step: the tokens plain decoding would produce next (greedy: exactly; sampled:
        in distribution), each with its logits (Verified); [] when nothing was drafted (the caller
        then takes a plain step)."""
        length = len(gen.sequences[0])
        drafts, q = self.plan(gen)
        if not drafts:
            return []
        out = self.verify(gen, drafts, q, gen.forward_all(drafts))
        cache = gen.cache
        assert cache is not None
        cache.trim(cache.offset - (length + len(out) - 1))  # keys of the kept drafts, less the last token
        return out

    def verify(self, gen: Generator, drafts: list[int], q: list[torch.Tensor] | None,
               logits: torch.Tensor) -> list[Verified]:
        """The tokens a verification pass yields, left to right, each with its logits (Verified):
        logits [len(drafts) + 1, V] are the model's after gen's sequence and after each draft (one
        pass: the Generator's own, or a row of the batch engine's). The drafts kept, then the
        target's token where the first one is rejected (or the bonus token after them all); an
        end-of-sequence token ends the run. Counts drafted / accepted for usage. Each token comes
        with its logits (a view of the pass's own output, never reused): its log-probability record
        (a log-softmax over the vocabulary, ~0.2 ms) is computed only if read."""
        out: list[Verified] = []
        accepted, ctx = 0, list(gen.sequences[0])
        for j in range(len(drafts) + 1):
            x = gen.chain(logits[j:j + 1], [ctx], gen._prompt_len, sorted(gen.eos))
            if j < len(drafts):
                t, ok = self._judge(x, drafts[j], None if q is None else q[j], gen)
            else:
                t, ok = int(gen.sampler(x, gen.rng)[0]), False  # every draft kept: the bonus token
            out.append((t, logits[j:j + 1]))
            ctx.append(t)
            accepted += ok
            if not ok or t in gen.eos:
                break
        self.drafted += len(drafts)
        self.accepted += accepted
        return out

    def _judge(self, x: torch.Tensor, d: int, q: torch.Tensor | None, gen: Generator) -> tuple[int, bool]:
        """(the token at this position, whether it is the drafted d)."""
        if gen.params.temperature <= 0:
            t = int(gen.sampler(x, None)[0])
            return t, t == d
        from .sampling import finite_choice

        probs = finite_choice(x)[0].softmax(dim=-1)
        qd = 1.0 if q is None else float(q[d])
        u = float(torch.rand((), generator=gen.rng, device=probs.device))
        if qd > 0 and u * qd < float(probs[d]):
            return d, True
        if q is None:
            residual = probs.clone()
            residual[d] = 0
        else:
            residual = (probs - q.to(probs.device)).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = probs
        return int(torch.multinomial(residual / residual.sum(), 1, generator=gen.rng)), False
