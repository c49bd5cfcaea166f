"""Continuous batching: concurrent requests give exactly what each gives alone."""
from __future__ import annotations

import threading

import pytest

import slmkit
from slmkit import InvalidRequestError


@pytest.mark.parametrize("kind", ["phi3", "gemma3"])
def test_sixteen_concurrent_requests_equal_their_solo_runs(phi3_folders, tmp_path, kind):
    if kind == "phi3":
        folder = phi3_folders("mha_sliding")  # a sliding window: per-row masks
    else:
        from tests.helpers.tiny_models import make_gemma3_folder

        folder = make_gemma3_folder(tmp_path / "g3", num_hidden_layers=6, layer_types=None)
    llm = slmkit.load(folder, dtype="float32")
    reqs = [(list(range(5 + i, 12 + 2 * i)), dict(max_new_tokens=6 + i % 5, temperature=0.0 if i % 2 else 0.9,
                                                  seed=i, ignore_eos=True)) for i in range(16)]
    solo = [llm.generate(p, **kw).token_ids for p, kw in reqs]
    llm.enable_batching(slots=6, context=128)
    llm.backend.batch.prefill_chunk = 4  # prompts of 7-37 tokens join over several steps
    got: list = [None] * 16

    def run(i: int) -> None:
        p, kw = reqs[i]
        got[i] = llm.generate(p, **kw).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo
    assert llm.backend.batch.steps < sum(len(s) for s in solo)  # steps were shared
    assert llm.backend.batch.active == 0 and llm.backend.batch.cache.n == 0


def test_cancelled_stream_frees_its_slot_and_limits_are_kept(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    llm.enable_batching(slots=2, context=64)
    stream = llm.generate(list(range(5, 15)), stream=True, max_new_tokens=50, ignore_eos=True, temperature=0)
    next(stream)
    stream.close()
    out = llm.generate(list(range(5, 15)), max_new_tokens=200, ignore_eos=True, temperature=0)
    assert out.finish_reason == "length" and 10 + len(out.token_ids) <= 64  # the slot's context bounds it
    assert llm.backend.batch.cache.n == 0
    with pytest.raises(InvalidRequestError):
        llm.enable_batching(slots=0)


def test_longrope_rows_cross_original_max_like_solo_runs(phi3_folders):
    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")  # original_max 32
    reqs = [(list(range(5 + i, 5 + i + n)), dict(max_new_tokens=m, temperature=0, ignore_eos=True))
            for i, (n, m) in enumerate([(20, 30), (28, 10), (40, 8), (10, 40), (31, 5), (33, 4)])]
    solo = [llm.generate(p, **kw).token_ids for p, kw in reqs]
    llm.enable_batching(slots=4, context=128)
    llm.backend.batch.prefill_chunk = 8
    got: list = [None] * len(reqs)

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i][0], **reqs[i][1]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo


@pytest.mark.parametrize("variant", ["gqa", "longrope"])
def test_finished_requests_leave_a_prompt_cache(phi3_folders, variant):
    """A prompt that starts like a finished request's tokens (a follow-up turn, a shared system
    prompt, the same prompt again) starts from that request's keys/values: same tokens as alone."""
    llm = slmkit.load(phi3_folders(variant), dtype="float32")  # longrope: original_max 32
    first = list(range(5, 25))
    kw = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    a = llm.generate(first, **kw).token_ids
    follow = first + a + [7, 8, 9]  # the conversation so far and a new turn
    other = list(range(40, 52))
    longer = first + a + list(range(60, 75))  # 41 tokens: past original_max for longrope
    solo = [llm.generate(p, **kw).token_ids for p in (first, follow, other, first, longer)]
    llm.enable_batching(slots=3, context=128)
    batch = llm.backend.batch
    assert llm.generate(first, **kw).token_ids == solo[0] and batch.reused_tokens == 0
    assert llm.generate(follow, **kw).token_ids == solo[1]
    left = len(first) + len(a) - 1  # the keys the first request left (its last token was never fed)
    assert batch.reused_tokens == left
    assert llm.generate(other, **kw).token_ids == solo[2] and batch.reused_tokens == left
    assert llm.generate(first, **kw).token_ids == solo[3]  # the same prompt: all but its last token
    assert batch.reused_tokens == left + len(first) - 1  # from follow's row, kept while "other" ran
    before = batch.reused_tokens
    assert llm.generate(longer, **kw).token_ids == solo[4]
    if variant == "longrope":
        assert batch.reused_tokens == before  # keys from the short frequency set are not reused past it
    else:
        assert batch.reused_tokens > before


def test_concurrent_requests_sharing_a_system_prompt_equal_their_solo_runs(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    system = list(range(5, 30))
    reqs = [(system + list(range(40 + i, 43 + i + i % 4)), dict(max_new_tokens=3 + i % 5, temperature=0.0,
                                                               ignore_eos=True)) for i in range(12)]
    solo = [llm.generate(p, **kw).token_ids for p, kw in reqs]
    llm.enable_batching(slots=4, context=96)
    llm.backend.batch.prefill_chunk = 8
    got: list = [None] * 12

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i][0], **reqs[i][1]).token_ids

    for wave in (range(0, 6), range(6, 12)):  # the second wave finds the first's rows kept
        threads = [threading.Thread(target=run, args=(i,)) for i in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert got == solo
    assert llm.backend.batch.reused_tokens >= 6 * len(system)


def test_a_burst_of_short_prompts_joins_in_one_step(phi3_folders):
    from slmkit.engine.batching import BatchEngine
    from slmkit.engine.generator import GeneratorParams

    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    prompts = [list(range(5 + i, 15 + i)) for i in range(4)]  # 10 tokens each: 40 fit one 64-token chunk
    solo = [llm.generate(p, max_new_tokens=5, temperature=0, ignore_eos=True).token_ids for p in prompts]
    batch = BatchEngine(llm.engine, slots=4, slot_context=64, prefill_chunk=64, start=False)
    got: list = [None] * 4

    def run(i: int) -> None:
        params = GeneratorParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
        got[i] = [t for t, _, _ in batch.submit(prompts[i], params)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while batch.incoming.qsize() < 4:  # all four wait before the engine runs
        threading.Event().wait(0.01)
    batch.start()
    for t in threads:
        t.join(timeout=60)
    assert got == solo
    assert batch.steps == 4  # all joined (each with its first token) in one step, then 4 shared steps
    batch.close()


def test_a_kv_plan_that_does_not_fit_is_refused_with_what_fits(phi3_folders, monkeypatch):
    from slmkit.errors import MemoryPlanError
    from slmkit.loading import memory

    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    a = llm.engine.args
    per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4
    monkeypatch.setattr(memory, "available_bytes", lambda: 512 * 2**20 + per_token * 4 * 100)
    with pytest.raises(MemoryPlanError) as e:
        llm.enable_batching(slots=4, context=256)
    assert "4 slots x 256 tokens" in str(e.value) and "4 slots fit 100 tokens each" in str(e.value)
    assert llm.backend.batch is None
    llm.enable_batching(slots=4, context=100)  # what it said fits, fits
    assert llm.backend.batch.cache.nbytes == per_token * 4 * 100
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: no check
    llm.enable_batching(slots=2, context=64)
    assert llm.backend.batch.cache.slots == 2
