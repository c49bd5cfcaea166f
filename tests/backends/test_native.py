"""The native backend's prompt cache (servers running one request at a time): a prompt that starts
like the previous request's tokens prefills only the rest, and gives the same tokens as alone."""
from __future__ import annotations

import pytest

import slmkit


@pytest.mark.parametrize("variant", ["gqa", "longrope"])
def test_prompt_cache_one_at_a_time(phi3_folders, variant):
    llm = slmkit.load(phi3_folders(variant), dtype="float32")
    first = list(range(5, 25))
    kw = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    a = llm.generate(first, **kw).token_ids
    follow = first + a + [7, 8, 9]
    other = list(range(40, 52))
    longer = follow + list(range(60, 75))  # past original_max (32) for longrope: re-prefilled long
    solo = [llm.generate(p, **kw).token_ids for p in (first, follow, other, longer, follow)]
    b = llm.backend
    b.prompt_cache = True
    assert llm.generate(first, **kw).token_ids == solo[0] and b.reused_tokens == 0
    assert llm.generate(follow, **kw).token_ids == solo[1]
    assert b.reused_tokens == len(first) + len(a) - 1  # all the first request's keys
    assert llm.generate(other, **kw).token_ids == solo[2]
    assert llm.generate(longer, **kw).token_ids == solo[3]
    stream = llm.generate(follow, stream=True, **kw)
    next(stream)
    stream.close()  # an abandoned request drops the cache instead of leaving half a state
    assert b._prompt_state.generator is None
    assert llm.generate(follow, **kw).token_ids == solo[4]
    sampled = [llm.generate(follow, max_new_tokens=5, temperature=1.0, seed=4).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seeded request is the same whether or not its prefix was cached
