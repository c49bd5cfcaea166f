"""Batch rows that draft with a draft model (each its own, run for that row alone), and rows whose
drafting or verification fails: greedy and seeded sampled rows equal in-process runs in tokens and
drafted / accepted counts; a failure ends its request alone."""
from __future__ import annotations

import threading

import pytest

import slmkit
from slmkit.engine.batching import BatchEngine
from slmkit.engine.generator import GeneratorParams
from slmkit.kernels.qgemm import get_kernel
from tests.helpers.batch_rows import (  # noqa: F401
    prompts,
    rows_never_run_the_model_themselves,
    solo,
    submit_two_then_start,
)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, llm):
    """Draft models for llm: the same weights (drafts mostly kept) and another random model (mostly not)."""
    from tests.helpers.tiny_models import make_phi3_folder

    root = tmp_path_factory.mktemp("bspec-drafts")
    return {"twin": slmkit.load(make_phi3_folder(root / "t", "gqa"), dtype="float32"),
            "other": slmkit.load(make_phi3_folder(root / "o", "gqa", seed=1), dtype="float32")}


def test_draft_model_rows_equal_in_process_runs(llm, drafts):
    """Rows drafting with a draft model (each its own), beside prompt-lookup and plain rows: greedy
    tokens and drafted / accepted counts equal in-process runs; sampled ones (a seed) draw what a
    single request draws, where the logits are batch-invariant."""
    ps = prompts(6, seed=4)
    cases = [(ps[0], dict(speculative="draft", draft=drafts["twin"])),
             (ps[1], dict(draft=drafts["other"])),  # "auto" with a draft model: the draft model
             (ps[2], dict(speculative="ngram")), (ps[3], dict(speculative="none")),
             (ps[4], dict(speculative="draft", draft=drafts["twin"], temperature=0.9, top_k=40, seed=3))]
    if get_kernel() is None:
        cases.pop()
    base = dict(max_new_tokens=16, temperature=0.0, ignore_eos=True, num_draft=4)
    alone = [llm.generate(p, **dict(base, **kw)) for p, kw in cases]
    assert alone[0].usage.accepted_tokens > 0 and alone[1].usage.drafted_tokens > 0
    llm.enable_batching(slots=4, context=128)
    llm.backend.batch.spec_extra_tokens = None  # every row drafts in full, as alone
    got: list = [None] * len(cases)

    def run(i: int) -> None:
        got[i] = llm.generate(cases[i][0], **dict(base, **cases[i][1]))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        llm.backend.batch.close()
        llm.backend.batch = None
    for (_, kw), a, g in zip(cases, alone, got):
        assert g.token_ids == a.token_ids, kw
        assert (g.usage.drafted_tokens, g.usage.accepted_tokens) == (a.usage.drafted_tokens,
                                                                     a.usage.accepted_tokens), kw


def test_a_row_whose_processor_fails_while_verifying_ends_alone(llm):
    """A speculating row whose scorer raises part-way through a verification: that request gets
    the error, the speculating row beside it its plain tokens, and both slots are freed."""
    from slmkit.errors import EngineError

    good_p, bad_p = prompts(3)[1], prompts(3)[2]
    kw = dict(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    want = solo(llm, good_p, **kw)
    calls = []

    def breaks_on_its_eighth_position(ids, logits):
        calls.append(len(ids))
        if len(calls) == 8:
            raise RuntimeError("the scorer broke")
        return logits

    batch = BatchEngine(llm.engine, slots=2, slot_context=128, start=False)
    try:
        reqs = [(good_p, GeneratorParams(**dict(kw, speculative="ngram", num_draft=4))),
                (bad_p, GeneratorParams(**dict(kw, speculative="ngram", num_draft=4,
                                                scorers=[breaks_on_its_eighth_position])))]
        got = submit_two_then_start(batch, reqs)
        assert isinstance(got[1], EngineError) and "the scorer broke" in str(got[1])
        assert got[0] == want
        assert batch.alive and batch.cache.n == 0
        again = GeneratorParams(**dict(kw, speculative="ngram", num_draft=4))
        assert [item[0] for item in batch.submit(good_p, again)] == want  # it goes on
    finally:
        batch.close()




def test_a_row_whose_draft_model_fails_ends_alone(llm, drafts, monkeypatch):
    """The draft model raises while drafting for one row: that request gets the error; a row
    drafting by prompt lookup beside it goes on to its plain tokens."""
    from slmkit.errors import EngineError

    broken = drafts["other"].engine.model
    real, calls = broken.forward, []

    def fails_on_the_tenth_pass(*a, **kw):
        calls.append(True)
        if len(calls) == 10:
            raise RuntimeError("the draft model broke")
        return real(*a, **kw)

    monkeypatch.setattr(broken, "forward", fails_on_the_tenth_pass)
    kw = dict(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    good_p, bad_p = prompts(3, seed=6)[1], prompts(3, seed=6)[2]
    want = solo(llm, good_p, **kw)
    batch = BatchEngine(llm.engine, slots=2, slot_context=128, start=False)
    reqs = [(good_p, GeneratorParams(speculative="ngram", **kw)),
            (bad_p, GeneratorParams(speculative="draft", draft=drafts["other"], **kw))]
    try:
        got = submit_two_then_start(batch, reqs)
        assert isinstance(got[1], EngineError) and "the draft model broke" in str(got[1])
        assert got[0] == want and len(calls) >= 10
        assert batch.alive and batch.cache.n == 0
    finally:
        batch.close()
