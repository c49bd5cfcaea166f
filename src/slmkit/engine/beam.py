"""Beam search with transformers' semantics (its vectorised `_beam_search`, batch of one prompt):
K = max(2, 1 + n_eos) * num_beams candidates per step, finished hypotheses scored as
sum_logprobs / generated_len ** length_penalty, early_stopping True / False / "never" with the
same stopping heuristic, so sequences and scores match `generate(num_beams=...)`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..checks import check_int
from ..errors import ContextLengthError
from ..options import check_search
from .engine import Engine, validate_token_ids

if TYPE_CHECKING:
    from .generator import GeneratorParams

NEG = -1.0e9


@dataclass
class Beam:
    token_ids: list[int]  # generated tokens (ending with the end-of-sequence token when it stopped)
    score: float  # sum of log-probabilities / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" or "length"


@torch.inference_mode()
def beam_search(engine: Engine, prompt: Sequence[int], *, num_beams: int = 4, max_new_tokens: int = 64,
                num_return_sequences: int = 1, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_ids: Sequence[int] | None = None,
                params: GeneratorParams | None = None, **processors: Any) -> list[Beam]:
    """processors: GeneratorParams options applied to each step's log-probabilities, as transformers
    applies its logits processors in beam search (repetition_penalty, no_repeat_ngram_size,
    logit_bias, min_new_tokens, scorers, ...; sampling filters do not apply); or params: a
    greedy GeneratorParams holding them."""
    check_search(num_beams, num_return_sequences, length_penalty, early_stopping)
    check_int(max_new_tokens, "max_new_tokens", lo=1, what="a positive integer")
    from .generator import GeneratorParams
    from .processors import LogitsChain

    if processors:
        params = GeneratorParams(temperature=0, **processors)
    chain = LogitsChain(params) if params is not None else None  # built once for the whole search
    prompt = validate_token_ids(prompt, engine.vocab_size, "prompt")
    eos = sorted(engine.eos_token_ids if eos_ids is None else eos_ids)
    B, P = num_beams, len(prompt)
    max_length = min(P + max_new_tokens, engine.context_length)
    if P >= max_length:
        raise ContextLengthError(P + 1, engine.context_length)
    K = max(2, 1 + len(eos)) * B
    eos_t = torch.tensor(eos, dtype=torch.long)
    top_mask = torch.arange(K) < B
    cache = engine.new_cache(B, max_length)
    logits = engine.forward(torch.tensor([prompt] * B), cache)[:, -1]
    running = torch.tensor([prompt] * B, dtype=torch.long)
    run_scores = torch.tensor([0.0] + [NEG] * (B - 1))
    fin = torch.zeros(B, max_length, dtype=torch.long)
    fin_len = torch.zeros(B, dtype=torch.long)
    fin_scores = torch.full((B,), NEG)
    is_fin = torch.zeros(B, dtype=torch.bool)
    improvable = True
    cur = P
    while True:
        V = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        if chain is not None:
            logp = chain(logp, running.tolist(), P, eos)
        acc = (logp + run_scores[:, None]).view(-1)
        top_lp, top_i = torch.topk(acc, K)
        beam, tok = top_i // V, top_i % V
        cand = torch.cat([running[beam], tok[:, None]], dim=1)  # [K, cur + 1]
        hits = torch.isin(tok, eos_t) | (cur + 1 >= max_length)
        # the next running beams: the best K candidates that did not stop
        keep = torch.topk(top_lp + hits.float() * NEG, B).indices
        # finished hypotheses: the stopping candidates among the top B, length-normalised
        norm = top_lp / ((cur + 1 - P) ** length_penalty)
        if bool(is_fin.all()) and early_stopping is True:
            norm = norm + NEG
        if not improvable:
            norm = norm + NEG
        did = hits & top_mask
        norm = norm + (~did).float() * NEG
        merged_scores = torch.cat([fin_scores, norm])
        pick = torch.topk(merged_scores, B).indices
        cand_pad = torch.zeros(K, max_length, dtype=torch.long)
        cand_pad[:, : cur + 1] = cand
        merged = torch.cat([fin, cand_pad])
        merged_len = torch.cat([fin_len, torch.full((K,), cur + 1)])
        fin, fin_len, fin_scores = merged[pick], merged_len[pick], merged_scores[pick]
        is_fin = torch.cat([is_fin, did])[pick]
        running, run_scores = cand[keep], (top_lp + hits.float() * NEG)[keep]
        cur += 1
        best_len = (max_length - P) if early_stopping == "never" and length_penalty > 0 else cur - P
        best_possible = run_scores[0] / (best_len ** length_penalty)
        worst = fin_scores.min() if bool(is_fin.all()) else torch.tensor(NEG)
        improvable = improvable and bool(best_possible > worst)
        if not (improvable and not (bool(is_fin.all()) and early_stopping is True) and not bool(hits.all())):
            break
        cache.reorder(beam[keep])
        logits = engine.forward(running[:, -1:], cache)[:, -1]
    out = []
    for i in range(num_return_sequences):
        ids = fin[i, P: int(fin_len[i])].tolist()
        out.append(Beam(ids, float(fin_scores[i]), "stop" if ids and ids[-1] in eos else "length"))
    return out
