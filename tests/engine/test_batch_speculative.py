"""Prompt-lookup speculation for rows of a continuous batch (engine/batching.py): greedy rows give
plain decoding's tokens, alone or mixed with plain rows of other lengths and with a row joining
mid-way, across the LongRoPE crossover, with stops and limits inside a verified run; sampled rows
follow the target distribution (chi-square) and, with a seed, draw what a single request draws;
usage counts what was drafted and accepted, as in process. Draft models and faults:
test_batch_speculative_drafts.py."""
from __future__ import annotations

import random
import threading

import pytest
import torch

import slmkit
from slmkit.engine import speculative
from slmkit.engine.batching import BatchEngine
from slmkit.engine.generator import Generator, GeneratorParams
from slmkit.engine.speculative import Speculator, lookup_draft
from slmkit.kernels.qgemm import get_kernel
from tests.helpers.batch_rows import (  # noqa: F401
    first_token_chi2,
    prompts,
    rows_never_run_the_model_themselves,
    run_batch,
    solo,
)


@pytest.mark.parametrize("extra", [None, 6, 0])
def test_mixed_rows_give_plain_decodings_tokens(llm, monkeypatch, extra):
    """Speculating rows (num_draft 2..6, "auto" with a long prompt) beside plain ones, prompts of
    several lengths, one row joining mid-way: every row's tokens are its plain solo run's; with a
    bound on a pass's extra tokens, no pass holds more."""
    ps = prompts(6) + [prompts(2, length=140, seed=7)[1]]
    modes = ["ngram", "none", "ngram", "ngram", "none", "ngram", "auto"]
    reqs = [(p[: 24 + 3 * i] if i < 6 else p, dict(max_new_tokens=18 + i, temperature=0.0, ignore_eos=True,
                                                     speculative=m, num_draft=2 + i % 5))
            for i, (p, m) in enumerate(zip(ps, modes))]
    want = [solo(llm, p, **{k: v for k, v in kw.items() if k not in ("speculative", "num_draft")}) for p, kw in reqs]
    batch = BatchEngine(llm.engine, slots=4, slot_context=256, prefill_chunk=32, spec_extra_tokens=extra, start=False)
    shapes = []
    forward_slots = llm.engine.forward_slots
    monkeypatch.setattr(llm.engine, "forward_slots", lambda ids, *a, **kw: (shapes.append(tuple(ids.shape)),
                                                                            forward_slots(ids, *a, **kw))[1])
    try:
        got = run_batch(batch, reqs, late=2)
    finally:
        batch.close()
    extras = [n * (w - 1) for n, w in shapes]
    if extra is None:
        assert max(w for _, w in shapes) >= 5 and max(extras) > 6  # wide passes of several rows
    elif extra == 0:
        assert max(w for _, w in shapes) == 1  # rows draft only in passes of their own (a prompt's last chunk)
    else:
        assert max(extras) <= extra and max(w for n, w in shapes if n > 1) > 1  # bounded, still speculating
    assert [[item[0] for item in items] for items in got] == want
    for (_, kw), items in zip(reqs, got):
        if kw["speculative"] == "none":
            assert all(len(item) == 3 for item in items)  # no usage totals: it never drafted
        else:
            drafted, accepted = items[-1][3:]
            assert drafted >= accepted >= 0
    totals = [items[-1][3:] for (_, kw), items in zip(reqs, got) if kw["speculative"] != "none"]
    assert sum(d for d, _ in totals) > 0 and batch.cache.n == 0
    if extra != 0:
        assert sum(a for _, a in totals) > 0
        assert batch.steps < sum(len(w) for w in want)  # runs of accepted drafts took fewer passes


def test_longrope_rows_cross_original_max_like_plain_runs(phi3_folders):
    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")  # original_max 32
    base = [q for j, q in enumerate(prompts(9, length=44, seed=3)) if j % 3]  # the self-repeating ones
    shapes = [(20, 30), (28, 10), (40, 8), (12, 36), (31, 5), (26, 12)]  # prompt, new: most cross 32
    reqs = [(base[i][:n], dict(max_new_tokens=m, temperature=0.0, ignore_eos=True,
                                                       speculative="ngram" if i != 3 else "none", num_draft=8))
            for i, (n, m) in enumerate(shapes)]
    want = [solo(llm, p, max_new_tokens=kw["max_new_tokens"], temperature=0.0, ignore_eos=True) for p, kw in reqs]
    batch = BatchEngine(llm.engine, slots=3, slot_context=128, prefill_chunk=8, spec_extra_tokens=None, start=False)
    try:
        got = run_batch(batch, reqs, late=1)
    finally:
        batch.close()
    assert [[item[0] for item in items] for items in got] == want
    assert sum(items[-1][3] for items in got if len(items[-1]) == 5) > 0


def test_a_row_speculating_across_the_crossover_equals_in_process(phi3_folders):
    """Past original_max a speculating row is re-prefilled with its drafts, as a single request's
    step there: greedy and seeded sampled rows give the in-process tokens and counts."""
    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")  # original_max 32
    p = [q for j, q in enumerate(prompts(3, length=24, seed=8)) if j % 3][0]
    cases = [dict(temperature=0.0)] + ([dict(temperature=0.9, top_k=40, seed=5)] if get_kernel() else [])
    kw = dict(max_new_tokens=30, ignore_eos=True, speculative="ngram", num_draft=8)
    alone = [llm.generate(p, **kw, **c) for c in cases]
    llm.enable_batching(slots=2, context=128)
    try:
        got = [llm.generate(p, **kw, **c) for c in cases]
    finally:
        llm.backend.batch.close()
        llm.backend.batch = None
    for a, g in zip(alone, got):
        assert g.token_ids == a.token_ids and a.usage.drafted_tokens > 0
        assert (g.usage.drafted_tokens, g.usage.accepted_tokens) == (a.usage.drafted_tokens, a.usage.accepted_tokens)


def verified_runs(monkeypatch) -> list[tuple[int, list[int]]]:
    """(tokens generated before it, its tokens) of every verification from now on."""
    runs: list[tuple[int, list[int]]] = []
    verify = Speculator.verify

    def spy(self, gen, drafts, q, logits):
        out = verify(self, gen, drafts, q, logits)
        runs.append((len(gen.sequences[0]) - gen._prompt_len, [t for t, _ in out]))
        return out

    monkeypatch.setattr(Speculator, "verify", spy)
    return runs


def inside(runs: list[tuple[int, list[int]]], index: int) -> bool:
    """Whether generated token `index` came out of a verified run after its first token (a kept draft)."""
    return any(start < index < start + len(run) for start, run in runs)


def test_stops_and_limits_inside_a_verified_run_end_where_plain_decoding_does(llm, monkeypatch):
    kw = dict(max_new_tokens=30, temperature=0, ignore_eos=True)
    llm.enable_batching(slots=2, context=128)
    try:
        runs = verified_runs(monkeypatch)
        found = None
        for p in [q for j, q in enumerate(prompts(9)) if j % 3]:
            runs.clear()
            tokens = llm.generate(p, speculative="ngram", num_draft=6, **kw).token_ids
            found = next(((p, tokens, start + j) for start, run in runs for j in range(1, len(run))
                          if tokens.index(run[j]) == start + j), None)  # a kept draft, first of its kind
            if found:
                break
        assert found, "no prompt gave a kept draft to stop at"
        p, tokens, at = found
        stop_text = llm.tokenizer.decode(tokens[:at + 1])[len(llm.tokenizer.decode(tokens[:at])):]
        cases = [dict(stop_token_ids=[tokens[at]], ignore_eos=False), dict(max_new_tokens=at + 1),
                 dict(max_length=len(p) + at + 1), dict(stop=[stop_text]),
                 dict(logprobs=True, top_logprobs=3), dict(repetition_penalty=1.3)]
        for n, case in enumerate(cases):
            args = dict(kw, **case)
            llm.backend.batch, batch = None, llm.backend.batch  # the plain reference in process
            want = llm.generate(p, speculative="none", **args)
            llm.backend.batch = batch
            runs.clear()
            got = llm.generate(p, speculative="ngram", num_draft=6, **args)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), case
            assert runs, case  # it did speculate
            if n < 3:  # it ended on a kept draft
                assert len(got.token_ids) == at + 1 and inside(runs, at), case
            if want.logprobs is not None:
                assert got.logprobs is not None
                for x, y in zip(got.logprobs, want.logprobs):
                    assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
                    assert [t.token_id for t in x.top_logprobs] == [t.token_id for t in y.top_logprobs]
    finally:
        llm.backend.batch.close()
        llm.backend.batch = None


def test_usage_in_a_batch_equals_in_process(llm):
    """The same request in process and as a batch row: the same tokens and the same drafted /
    accepted counts (both speculate from the first token on)."""
    p = prompts(3)[1]
    kw = dict(max_new_tokens=24, temperature=0, ignore_eos=True, speculative="ngram", num_draft=5)
    alone = llm.generate(p, **kw)
    assert alone.usage.accepted_tokens > 0
    llm.enable_batching(slots=2, context=128)
    try:
        batched = llm.generate(p, **kw)
        streamed = list(llm.generate(p, stream=True, **kw))
    finally:
        llm.backend.batch.close()
        llm.backend.batch = None
    assert batched.token_ids == alone.token_ids
    assert (batched.usage.drafted_tokens, batched.usage.accepted_tokens) == (alone.usage.drafted_tokens,
                                                                             alone.usage.accepted_tokens)
    last = streamed[-1]
    assert (last.usage.drafted_tokens, last.usage.accepted_tokens) == (alone.usage.drafted_tokens,
                                                                       alone.usage.accepted_tokens)


@pytest.mark.skipif(get_kernel() is None, reason="the same draws need batch-invariant logits (compiled kernels)")
def test_sampled_rows_draw_what_a_single_request_draws(llm):
    """With a seed, a sampled speculating row of a batch (beside another) uses its logits and its
    random numbers as a single request does: the same tokens, the same usage."""
    ps = prompts(3)
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=40, ignore_eos=True, speculative="ngram", num_draft=4)
    alone = [llm.generate(p, seed=11 + i, **kw) for i, p in enumerate(ps[1:])]
    assert sum(r.usage.accepted_tokens for r in alone) > 0
    batch = BatchEngine(llm.engine, slots=2, slot_context=128, start=False)
    try:
        got = run_batch(batch, [(p, dict(kw, seed=11 + i)) for i, p in enumerate(ps[1:])])
    finally:
        batch.close()
    for r, items in zip(alone, got):
        assert [item[0] for item in items] == r.token_ids
        assert items[-1][3:] == (r.usage.drafted_tokens, r.usage.accepted_tokens)


def test_sampled_first_tokens_follow_the_target_distribution(llm):
    """A batch row's first token (its prompt's last chunk and drafts in one pass, verified by the
    speculative-sampling rule), drawn 400 times with seeds 0..399: chi-square of its histogram
    against the target's processed distribution over the drafted token, the 4 likeliest others and
    the rest (5 dof; 20.5 is the 0.1% critical value)."""
    prompt = prompts(2)[1]
    drafted = lookup_draft(prompt, 1)[0]
    params = dict(temperature=0.8, top_k=40, logit_bias={drafted: 4.0}, ignore_eos=True)
    gen = Generator(llm, GeneratorParams(max_new_tokens=1, **params))
    gen.append_tokens(prompt)
    p = gen.chain(gen.get_logits(), gen.sequences, len(prompt), sorted(gen.eos))[0].softmax(dim=-1)
    assert 0.2 < float(p[drafted]) < 0.9  # both acceptance and rejection happen
    draws = 400
    counts = torch.zeros(llm.engine.vocab_size)
    batch = BatchEngine(llm.engine, slots=2, slot_context=128)
    try:
        for seed in range(draws):
            steps = batch.submit(prompt, GeneratorParams(max_new_tokens=4, seed=seed, speculative="ngram",
                                                         num_draft=3, **params))
            item = next(steps)
            steps.close()  # the rest of the request is not needed
            assert item[3] > 0  # it drafted
            counts[item[0]] += 1
    finally:
        batch.close()
    chi2 = first_token_chi2(p, drafted, counts, draws)
    assert chi2 < 20.5, chi2


def test_structured_output_cannot_speculate_in_a_row_either(llm):
    from slmkit import InvalidRequestError

    batch = BatchEngine(llm.engine, slots=2, slot_context=64)
    try:
        p = prompts(2)[1]
        with pytest.raises(InvalidRequestError) as e:
            next(batch.submit(p, GeneratorParams(max_new_tokens=4, speculative="ngram",
                                                 json_schema={"type": "object"})))
        assert e.value.param == "speculative"
        items = list(batch.submit(p, GeneratorParams(max_new_tokens=4, json_schema={"type": "object"})))
        assert 0 < len(items) <= 4 and all(len(item) == 3 for item in items)  # "auto": plainly
    finally:
        batch.close()


def test_a_wide_pass_keeps_a_short_row_short_of_the_crossover(phi3_folders, monkeypatch):
    """A row that drafts num_draft tokens at every step (its prompt holds every token, so each
    last token has a continuation to look up; one-token matches draft in full here) beside plain
    rows walking up to original_max: the pass is never so wide that their padding takes them into
    the long frequency set early."""
    monkeypatch.setattr(speculative, "UNIGRAM_DRAFT", 8)
    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")  # original_max 32
    every = list(range(3, llm.engine.vocab_size))
    random.Random(5).shuffle(every)
    reqs = [(every, dict(max_new_tokens=24, temperature=0.0, ignore_eos=True, speculative="ngram", num_draft=8))]
    reqs += [(list(range(40 + i, 40 + n + i)), dict(max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                                     speculative="none")) for i, n in enumerate((26, 29))]
    want = [solo(llm, p, **{k: v for k, v in kw.items() if k not in ("speculative", "num_draft")}) for p, kw in reqs]
    batch = BatchEngine(llm.engine, slots=3, slot_context=len(every) + 64, prefill_chunk=1024, spec_extra_tokens=None,
                        start=False)
    try:
        got = run_batch(batch, reqs)
    finally:
        batch.close()
    assert [[item[0] for item in items] for items in got] == want
    assert got[0][-1][3] >= 8 * 3  # it drafted in full while the others crossed


@pytest.mark.skipif(get_kernel() is None, reason="bit-equal logits need the compiled kernels")
@pytest.mark.parametrize("dtype,quant", [("bfloat16", None), ("float32", "int8"), ("bfloat16", "int4")])
def test_verified_tokens_have_plain_decodings_logprobs_to_the_bit(phi3_folders, dtype, quant):
    """Speculating rows (drafts of several widths in one ragged pass) on the bf16 and quantized
    kernel paths: every token and its log-probability equal a plain solo run's, bit for bit."""
    llm = slmkit.load(phi3_folders("gqa"), dtype=dtype, quant=quant)
    reqs = [(p[: 30 + 4 * i], 14) for i, p in enumerate(prompts(6, seed=9)) if i % 3]
    want = []
    for p, n in reqs:
        gen = Generator(llm, GeneratorParams(max_new_tokens=n, ignore_eos=True, speculative="none"))
        gen.append_tokens(p)
        run = []
        while not gen.is_done():
            gen.generate_next_token()
            run.append((gen.get_next_tokens()[0], gen.last_logprobs[0][1]))
        want.append(run)
    batch = BatchEngine(llm.engine, slots=4, slot_context=128, prefill_chunk=16, spec_extra_tokens=None, start=False)
    got: list = [None] * len(reqs)

    def run_one(i: int) -> None:
        params = GeneratorParams(max_new_tokens=reqs[i][1], ignore_eos=True, speculative="ngram", num_draft=2 + i)
        got[i] = [(item[0], item[2][1], item[4]) for item in batch.submit(reqs[i][0], params, want_logprobs=True)]

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    while batch.incoming.qsize() < len(reqs):
        threading.Event().wait(0.01)
    batch.start()
    for t in threads:
        t.join(timeout=120)
    batch.close()
    assert [[(t, lp) for t, lp, _ in g] for g in got] == want
    assert sum(g[-1][2] for g in got) > 0  # drafts were kept


@pytest.mark.parametrize("kind", ["phi3-sliding", "gemma3"])
def test_rows_past_a_sliding_window_give_plain_decodings_tokens(phi3_folders, tmp_path, kind):
    """Window 8: verification passes of several rows straddle the window's edge."""
    if kind == "gemma3":
        from tests.helpers.tiny_models import make_gemma3_folder

        llm = slmkit.load(make_gemma3_folder(tmp_path / "g3", num_hidden_layers=3, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"]), dtype="float32")
    else:
        llm = slmkit.load(phi3_folders("mha_sliding"), dtype="float32")
    reqs = [(p[: 20 + 3 * i], dict(max_new_tokens=16, temperature=0.0, ignore_eos=True, speculative="ngram",
                                   num_draft=6)) for i, p in enumerate(prompts(5, seed=2)) if i % 3]
    want = [solo(llm, p, max_new_tokens=16, temperature=0.0, ignore_eos=True) for p, _ in reqs]
    batch = BatchEngine(llm.engine, slots=3, slot_context=128, spec_extra_tokens=None, start=False)
    try:
        got = run_batch(batch, reqs)
    finally:
        batch.close()
    assert [[item[0] for item in items] for items in got] == want
    assert sum(items[-1][3] for items in got) > 0
