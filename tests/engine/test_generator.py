"""The step loop: lazy logits, set_logits, rewind_to, limits, sampling and stop handling."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import ContextLengthError, Generator, GeneratorParams, InvalidRequestError
from slmkit.engine.sampling import apply_top_k, apply_top_p, sample
from slmkit.text.stops import StopStrings


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("gen"), "gqa"), dtype="float32")


PROMPT = [10, 20, 30, 40, 50, 60]


def run(gen: Generator) -> list[int]:
    while not gen.is_done():
        gen.generate_next_token()
    return gen.get_sequence(0)


def test_greedy_loop_matches_generate(llm):
    gen = Generator(llm, GeneratorParams(max_new_tokens=10, ignore_eos=True))
    gen.append_tokens(PROMPT)
    seq = run(gen)
    assert seq[:6] == PROMPT and len(seq) == 16
    assert seq[6:] == llm.generate(PROMPT, max_new_tokens=10, temperature=0, ignore_eos=True).token_ids
    assert gen.finish_reasons == ["length"]


def test_max_length_counts_prompt(llm):
    gen = Generator(llm, GeneratorParams(max_length=9, ignore_eos=True))
    gen.append_tokens(PROMPT)
    assert len(run(gen)) == 9


def test_set_logits_steers_next_token(llm):
    gen = Generator(llm, GeneratorParams(max_new_tokens=3, ignore_eos=True))
    gen.append_tokens(PROMPT)
    forced = torch.full_like(gen.get_logits(), -1e9)
    forced[0, 123] = 0
    gen.set_logits(forced)
    gen.generate_next_token()
    assert gen.get_next_tokens() == [123]
    with pytest.raises(InvalidRequestError, match="shape"):
        gen.set_logits(torch.zeros(3))


def test_an_external_logits_generator_takes_its_logits_through_set_logits(llm):
    """The batch engine's way in: a generator that never runs the model gets each step's logits
    from set_logits (it once wrote the private _logits, as set_logits refused before the first)."""
    gen = Generator(llm, GeneratorParams(max_new_tokens=2, ignore_eos=True), external_logits=True)
    gen.append_tokens(PROMPT)
    with pytest.raises(InvalidRequestError, match="shape"):
        gen.set_logits(torch.zeros(3))
    with pytest.raises(InvalidRequestError, match="NaN"):
        gen.set_logits(torch.full((llm.engine.vocab_size,), float("nan")))
    for want in (7, 99):
        forced = torch.full((llm.engine.vocab_size,), -1e9)
        forced[want] = 0
        gen.set_logits(forced)
        gen.generate_next_token()
        assert gen.get_next_tokens() == [want]
    assert gen.get_sequence(0) == PROMPT + [7, 99] and gen.is_done()


def test_rope_crossover_is_one_rule(phi3_folders):
    """Engine.rope_switches (the batch engine's test) and the regime tag (the Generator's) agree:
    long past original_max, and only for LongRoPE."""
    long = slmkit.load(phi3_folders("longrope"), dtype="float32").engine  # original_max 32
    assert long.rope_crossover == 32
    assert [long.rope_switches(n) for n in (1, 32, 33)] == [False, False, True]
    assert [long.rope_regime(n) for n in (32, 33)] == ["short", "long"]
    plain = slmkit.load(phi3_folders("gqa"), dtype="float32").engine
    assert plain.rope_crossover is None and not plain.rope_switches(10**6)


def test_rewind_then_regenerate_is_identical(llm):
    gen = Generator(llm, GeneratorParams(max_new_tokens=8, ignore_eos=True))
    gen.append_tokens(PROMPT)
    first = run(gen)
    gen.rewind_to(len(PROMPT) + 3)
    assert gen.get_sequence(0) == first[: len(PROMPT) + 3]
    assert (gen.get_logits()[0] - llm.logits(first[: len(PROMPT) + 3])[-1]).abs().max() <= 1e-4
    gen.append_tokens([7, 8])
    assert (gen.get_logits()[0] - llm.logits(first[: len(PROMPT) + 3] + [7, 8])[-1]).abs().max() <= 1e-4
    gen.rewind_to(0)
    assert gen.get_sequence(0) == []
    with pytest.raises(InvalidRequestError):
        gen.rewind_to(5)


def test_eos_stops_with_reason(llm):
    eos = next(iter(llm.engine.eos_token_ids))
    gen = Generator(llm, GeneratorParams(max_new_tokens=5))
    gen.append_tokens(PROMPT)
    x = torch.full_like(gen.get_logits(), -1e9)
    x[0, eos] = 0
    gen.set_logits(x)
    gen.generate_next_token()
    assert gen.is_done() and gen.finish_reasons == ["stop"]
    with pytest.raises(InvalidRequestError, match="done"):
        gen.generate_next_token()


def test_prompt_longer_than_context_is_refused(llm):
    n = llm.context_length + 1
    with pytest.raises(ContextLengthError) as e:
        Generator(llm).append_tokens([5] * n)
    assert e.value.limit == llm.context_length and str(llm.context_length) in str(e.value)
    with pytest.raises(ContextLengthError):
        llm.generate([5] * n)


def test_bad_token_ids_are_refused(llm):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        Generator(llm).append_tokens([1, llm.engine.vocab_size])
    with pytest.raises(InvalidRequestError):
        Generator(llm).generate_next_token()


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_k", -2), ("max_length", 0),
                                         ("seed", "x"), ("batch_size", 0)])
def test_params_validated(field, value):
    with pytest.raises(InvalidRequestError) as e:
        GeneratorParams(**{field: value})
    assert e.value.param == field


def test_set_search_options():
    p = GeneratorParams()
    p.set_search_options(do_sample=True, top_k=5, max_length=30)
    assert p.temperature == 1.0 and p.top_k == 5 and p.max_length == 30
    with pytest.raises(InvalidRequestError):
        p.set_search_options(bogus=1)


def test_seeded_sampling_is_reproducible_and_varies(llm):
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = llm.generate(PROMPT, seed=1, **kw).token_ids
    b = llm.generate(PROMPT, seed=1, **kw).token_ids
    c = llm.generate(PROMPT, seed=2, **kw).token_ids
    assert a == b and a != c


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    assert torch.isinf(apply_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(apply_top_p(logits, float(probs[0] + 0.01))).tolist() == [[False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample(logits, temperature=0).item() == 0


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["###", "END"])
    assert s.feed("Hello #") == "Hello "
    assert s.feed("# x") == "## x"
    assert s.feed(" E") == " "
    assert s.feed("NDING") == "" and s.stopped
    s = StopStrings(["\n\n"])
    assert s.feed("a\n") == "a" and s.flush() == "\n"


def test_cache_is_sized_by_request_and_grows(llm):
    """No preallocation of the whole context: a long-context model must not allocate it all."""
    gen = Generator(llm, GeneratorParams(ignore_eos=True))  # no max_new_tokens: starts small
    gen.append_tokens(PROMPT)
    assert gen.cache.capacity < llm.context_length
    cap = gen.cache.capacity
    while len(gen.get_sequence(0)) <= cap + 1:
        gen.generate_next_token()
    gen.get_logits()
    assert gen.cache.capacity > cap
    assert (gen.get_logits()[0] - llm.logits(gen.get_sequence(0))[-1]).abs().max() <= 1e-4


def test_prompt_filling_max_length_is_done_at_once(llm):
    gen = Generator(llm, GeneratorParams(max_length=len(PROMPT), ignore_eos=True))
    gen.append_tokens(PROMPT)
    assert gen.is_done() and gen.finish_reasons == ["length"]
    with pytest.raises(InvalidRequestError):
        gen.generate_next_token()
    full = Generator(llm, GeneratorParams(ignore_eos=True))
    full.append_tokens([5] * llm.context_length)
    assert full.is_done() and len(full.get_sequence(0)) == llm.context_length


def test_generator_bad_inputs_are_typed(llm):
    gen = Generator(llm, GeneratorParams(max_new_tokens=2))
    for bad in ("hello", ["a"], [1.5], 7):
        with pytest.raises(InvalidRequestError):
            gen.append_tokens(bad)
    gen.append_tokens(PROMPT)
    with pytest.raises(InvalidRequestError, match="row index"):
        gen.get_sequence(5)
    with pytest.raises(InvalidRequestError, match="finite"):
        gen.set_logits(torch.full_like(gen.get_logits(), float("-inf")))
    with pytest.raises(InvalidRequestError, match="finite"):
        gen.set_logits(torch.full_like(gen.get_logits(), float("nan")))
    with pytest.raises(InvalidRequestError) as e:
        GeneratorParams(stop_token_ids=["a"])
    assert e.value.param == "stop_token_ids"


def test_packing_leaves_other_threads_thread_count_alone():
    import threading

    from torch import nn

    from slmkit.loading.packing import pack_linears, packing_available

    if not packing_available():
        pytest.skip("oneDNN packing unavailable")
    before = torch.get_num_threads()
    seen, go = {}, threading.Event()

    def worker():
        go.wait()
        seen["threads"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).to(torch.bfloat16)
    assert pack_linears(model) == 2
    go.set()
    t.join()
    assert seen["threads"] == before == torch.get_num_threads()
