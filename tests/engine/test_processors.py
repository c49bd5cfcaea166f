"""Each logits processor against transformers' equivalent on random logits, and hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from slmkit.engine import processors as P

V = 50


def logits_and_ids(seed: int = 0, b: int = 3, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3, torch.randint(0, V, (b, s), generator=g)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(
        a.masked_fill(torch.isinf(a), 0), b.masked_fill(torch.isinf(b), 0), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_processors_match_transformers(seed):
    tr = pytest.importorskip("transformers.generation.logits_process")
    x, ids = logits_and_ids(seed)
    assert same(P.apply_repetition_penalty(x, ids, 1.3), tr.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()))
    assert same(P.apply_top_k(x, 7), tr.TopKLogitsWarper(7)(ids, x.clone()))
    for p in (0.05, 0.5, 0.9):
        assert same(P.apply_top_p(x, p), tr.TopPLogitsWarper(p)(ids, x.clone()))
        assert same(P.apply_min_p(x, p), tr.MinPLogitsWarper(p)(ids, x.clone()))
        assert same(P.apply_typical_p(x, p), tr.TypicalLogitsWarper(p)(ids, x.clone()))
    ng_ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4, 4, 5, 6, 4, 4], ids[2, :8].tolist()])
    for n in (1, 2, 3):
        assert same(P.apply_no_repeat_ngram(x, ng_ids, n), tr.NoRepeatNGramLogitsProcessor(n)(ng_ids, x.clone()))


def test_penalties_and_bias_by_hand():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    gen = torch.tensor([[0, 0, 1]])
    # OpenAI: logit -= presence * [count > 0] + frequency * count
    out = P.apply_presence_frequency(x, gen, presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([[2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5]]))
    assert torch.equal(P.apply_repetition_penalty(x, gen, 2.0), torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    assert torch.equal(P.apply_logit_bias(x, {3: 10.0, 1: -100.0}), torch.tensor([[2.0, -102.0, 1.0, 10.5]]))
    # min_p 0.5: keep tokens with p >= 0.5 * p_max
    probs = x.softmax(-1)
    keep = probs >= 0.5 * probs.max()
    assert torch.equal(~torch.isinf(P.apply_min_p(x, 0.5)), keep)
    out = P.apply_min_new_tokens(x, produced=1, min_new=2, eos_ids=[0])
    assert out[0, 0] == float("-inf") and torch.equal(out[0, 1:], x[0, 1:])
    assert torch.equal(P.apply_min_new_tokens(x, produced=2, min_new=2, eos_ids=[0]), x)


def test_every_filter_keeps_at_least_one_token():
    x = torch.tensor([[5.0, 5.0, -1.0], [0.0, -50.0, -50.0]])
    for out in (P.apply_top_p(x, 1e-9), P.apply_min_p(x, 1.0), P.apply_typical_p(x, 1e-9), P.apply_top_k(x, 1)):
        assert (~torch.isinf(out)).sum(-1).min() >= 1


def test_chain_with_top_k_filters_only_the_survivors_but_equals_the_plain_chain():
    from slmkit import GeneratorParams

    x, ids = logits_and_ids(7, b=1)
    p = GeneratorParams(temperature=0.8, top_k=9, top_p=0.8, min_p=0.1, typical_p=0.9)
    plain = P.apply_typical_p(P.apply_min_p(P.apply_top_p(P.apply_top_k(x / 0.8, 9), 0.8), 0.1), 0.9)
    assert same(P.process(x, p, ids.tolist(), 4, []), plain)
