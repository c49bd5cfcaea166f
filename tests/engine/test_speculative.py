"""Speculative decoding: greedy output equals plain decoding token for token (prompt lookup and a
draft model; across the LongRoPE crossover; with stops, limits, logprobs), sampled output follows
the target distribution (chi-square over a fixed seed budget), and what cannot speculate says so."""
from __future__ import annotations

import random

import pytest
import torch

import slmkit
from slmkit import Generator, GeneratorParams, InvalidRequestError
from slmkit.engine.speculative import AUTO_MIN_PROMPT, UNIGRAM_DRAFT, lookup_draft
from tests.helpers.batch_rows import first_token_chi2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    root = tmp_path_factory.mktemp("spec")
    target = make_phi3_folder(root / "t", "gqa")
    return {"target": slmkit.load(target, dtype="float32"),
            "twin": slmkit.load(target, dtype="float32"),  # the same weights: drafts mostly accepted
            "other": slmkit.load(make_phi3_folder(root / "d", "gqa", seed=1), dtype="float32")}


def prompts(n: int, length: int = 40, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so prompt lookup finds drafts) and some that do not."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(3, 400) for _ in range(length // 2)]
        out.append(base + base[: length // 2] if i % 3 else [rng.randrange(3, 400) for _ in range(length)])
    return out


def test_lookup_draft_continues_the_latest_ngram():
    seq = [1, 2, 3, 4, 5, 9, 2, 3]
    assert lookup_draft(seq, 3) == [4, 5, 9]
    assert lookup_draft(seq, 1) == [4]
    assert lookup_draft([1, 2, 3], 4) == []
    assert lookup_draft([5, 6, -1, 5], 3) == [6]  # image placeholders are never drafted
    # a one-token match drafts at most UNIGRAM_DRAFT tokens; a longer one all k
    seq = [7, 1, 2, 3, 4, 5, 6, 8, 1]
    assert lookup_draft(seq, 5) == [2, 3, 4, 5, 6][:UNIGRAM_DRAFT]
    assert lookup_draft(seq + [2], 5) == [3, 4, 5, 6, 8]


@pytest.mark.parametrize("mode", ["ngram", "draft-twin", "draft-other"])
def test_greedy_output_is_plain_decoding_token_for_token(models, mode):
    llm = models["target"]
    extra = {} if mode == "ngram" else {"draft": models[mode.split("-")[1]]}
    speculative = "ngram" if mode == "ngram" else "draft"
    drafted = accepted = 0
    for i, p in enumerate(prompts(4)):
        kw = dict(max_new_tokens=20, temperature=0, ignore_eos=True, num_draft=2 + i % 5)
        plain = llm.generate(p, speculative="none", **kw)
        spec = llm.generate(p, speculative=speculative, **kw, **extra)
        assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason
        assert plain.usage.drafted_tokens == 0
        drafted, accepted = drafted + spec.usage.drafted_tokens, accepted + spec.usage.accepted_tokens
    assert drafted > 0 and accepted <= drafted
    if mode != "draft-other":  # another random model's drafts are all rejected: the rejection path
        assert accepted > 0
    if mode == "draft-twin":
        assert accepted >= 0.8 * drafted  # the same weights agree (up to ties between passes)


def test_greedy_identity_across_the_longrope_crossover(phi3_folders):
    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")  # original_max 32
    twin = slmkit.load(phi3_folders("longrope"), dtype="float32")
    for p in prompts(3, length=20, seed=3):  # 20 prompt tokens + 30 new: the crossover at 32 is inside
        plain = llm.generate(p, max_new_tokens=30, temperature=0, ignore_eos=True, speculative="none")
        for kw in ({"speculative": "ngram", "num_draft": 8}, {"speculative": "draft", "draft": twin}):
            spec = llm.generate(p, max_new_tokens=30, temperature=0, ignore_eos=True, **kw)
            assert spec.token_ids == plain.token_ids, kw


def test_greedy_identity_past_a_sliding_window(phi3_folders):
    llm = slmkit.load(phi3_folders("mha_sliding"), dtype="float32")  # window 8: verification passes straddle it
    for p in prompts(2, length=24, seed=5):
        kw = dict(max_new_tokens=20, temperature=0, ignore_eos=True)
        plain = llm.generate(p, speculative="none", **kw).token_ids
        assert llm.generate(p, speculative="ngram", num_draft=6, **kw).token_ids == plain
        assert llm.generate(p, speculative="draft", draft=llm, **kw).token_ids == plain


def test_stops_limits_and_logprobs_match_plain(models):
    llm, twin = models["target"], models["twin"]
    p = prompts(2)[1]
    ref = llm.generate(p, max_new_tokens=30, temperature=0, ignore_eos=True, speculative="none")
    stop_id = ref.token_ids[7]
    stop_text = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 3]
    cases = [dict(stop_token_ids=[stop_id]), dict(stop=[stop_text], ignore_eos=True),
             dict(max_new_tokens=5, ignore_eos=True), dict(max_length=len(p) + 3, ignore_eos=True),
             dict(logprobs=True, top_logprobs=3, ignore_eos=True), dict(repetition_penalty=1.3, ignore_eos=True)]
    for case in cases:
        kw = dict(dict(max_new_tokens=30, temperature=0), **case)
        plain = llm.generate(p, speculative="none", **kw)
        for spec_kw in ({"speculative": "ngram"}, {"speculative": "draft", "draft": twin}):
            spec = llm.generate(p, **kw, **spec_kw)
            assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text,
                                                                      plain.finish_reason), (case, spec_kw)
            if plain.logprobs is not None:
                assert spec.logprobs is not None
                for a, b in zip(spec.logprobs, plain.logprobs):
                    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]


def test_generator_and_session_speculate(models):
    llm = models["target"]
    p = prompts(2)[1]
    plain = llm.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True, speculative="none").token_ids
    gen = Generator(llm, GeneratorParams(max_new_tokens=12, ignore_eos=True, speculative="ngram"))
    gen.append_tokens(p)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(gen.get_next_tokens()[0])  # one token per call, as in plain decoding
    assert out == plain and gen.drafted_tokens > 0
    gen.rewind_to(len(p) + 3)  # drops what a speculative step had queued; resumes exactly
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.get_sequence(0)[len(p):] == plain
    session = llm.backend.new_session()
    for _ in range(2):
        r = llm.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True, speculative="ngram", session=session)
        assert r.token_ids == plain


def test_auto_uses_prompt_lookup_for_long_prompts_only(models):
    llm = models["target"]
    short = prompts(2, length=40)[1]
    long = prompts(2, length=AUTO_MIN_PROMPT + 20)[1]
    kw = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    assert llm.generate(short, **kw).usage.drafted_tokens == 0
    r = llm.generate(long, **kw)
    assert r.usage.drafted_tokens > 0
    assert r.token_ids == llm.generate(long, speculative="none", **kw).token_ids


def test_what_cannot_speculate_is_refused_by_name(models, tmp_path):
    from tests.helpers.tiny_models import make_phi3_folder

    llm = models["target"]
    p = prompts(2)[1]
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(p, max_new_tokens=4, speculative="ngram", json_schema={"type": "object"})
    assert e.value.param == "speculative"
    # under "auto" structured output decodes plainly
    assert llm.generate(p, max_new_tokens=4, json_schema={"type": "object"}).usage.drafted_tokens == 0
    for bad, param in ((dict(speculative="fast"), "speculative"), (dict(num_draft=0), "num_draft"),
                       (dict(speculative="draft"), "draft"), (dict(speculative="none", draft=llm), "draft"),
                       (dict(speculative="draft", draft="phi-3"), "draft")):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate(p, max_new_tokens=2, **bad)
        assert e.value.param == param, bad
    padded = slmkit.load(make_phi3_folder(tmp_path / "v", "gqa", vocab_size=640), dtype="float32")
    with pytest.raises(InvalidRequestError, match="vocabulary") as e:
        llm.generate(p, max_new_tokens=2, speculative="draft", draft=padded)
    assert e.value.param == "draft"


def first_token_counts(llm, prompt, params: dict, draws: int) -> torch.Tensor:
    """One generator, rewound to the prompt before each draw and reseeded (seeds 0..draws-1)."""
    counts = torch.zeros(llm.engine.vocab_size)
    gen = Generator(llm, GeneratorParams(max_new_tokens=4, ignore_eos=True, seed=0, **params))
    gen.append_tokens(prompt)
    for seed in range(draws):
        gen.rewind_to(len(prompt))
        gen.rng.manual_seed(seed)
        if gen.speculator is not None and gen.speculator.draft_gen is not None:
            gen.speculator.draft_gen.rng.manual_seed(seed + 10**6)
        gen.generate_next_token()
        counts[gen.get_next_tokens()[0]] += 1
    assert gen.drafted_tokens > 0
    return counts


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_sampled_tokens_follow_the_target_distribution(models, mode):
    """The first token of a speculative step, drawn 400 times (seeds 0..399): chi-square of its
    histogram against the target's processed distribution, over the drafted token, the 4 likeliest
    others and the rest (5 dof; 20.5 is the 0.1% critical value)."""
    llm = models["target"]
    prompt = prompts(2)[1]
    drafted = lookup_draft(prompt, 1)[0]
    bias = {drafted: 4.0}  # make the drafted token likely, so both acceptance and rejection happen
    params = dict(temperature=0.8, top_k=40, logit_bias=bias, num_draft=3)
    params.update(speculative="ngram") if mode == "ngram" else params.update(speculative="draft",
                                                                               draft=models["other"])
    gen = Generator(llm, GeneratorParams(max_new_tokens=1, **{k: v for k, v in params.items()
                                                                 if k not in ("speculative", "draft")}))
    gen.append_tokens(prompt)
    x = gen.chain(gen.get_logits(), gen.sequences, len(prompt), sorted(gen.eos))
    p = x[0].softmax(dim=-1)
    assert 0.2 < float(p[drafted]) < 0.9
    draws = 400
    counts = first_token_counts(llm, prompt, params, draws)
    chi2 = first_token_chi2(p, drafted, counts, draws)
    assert chi2 < 20.5, chi2
