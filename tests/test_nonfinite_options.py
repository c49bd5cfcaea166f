"""Options that drive logits to NaN or infinity (a temperature of 1e-45, a repetition penalty of
1e-45, a scorer's inf or NaN) never crash a generation: their limit is used, or a typed error."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import GeneratorParams, InvalidRequestError
from slmkit.engine.sampling import draw, finite_choice

INF, NAN = float("inf"), float("nan")
DIGITS = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^[0-9]{40}$"}}}


@pytest.fixture(scope="module")
def llm(phi3_folders):
    return slmkit.load(phi3_folders("gqa"), dtype="float32")


def test_a_tiny_temperature_is_greedy(llm):
    assert GeneratorParams(temperature=1e-45).temperature == 0.0
    assert GeneratorParams(temperature=1e-3).temperature == 1e-3
    greedy = llm.generate("Hello", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert llm.generate("Hello", max_new_tokens=8, temperature=1e-45, seed=3, ignore_eos=True).token_ids == greedy
    msgs = [{"role": "user", "content": "Hi"}]
    assert llm.chat(msgs, max_new_tokens=6, temperature=1e-30).text == llm.chat(msgs, max_new_tokens=6,
                                                                                 temperature=0).text


@pytest.mark.parametrize("call", ["generate", "chat"])
def test_an_extreme_repetition_penalty_under_a_grammar_gives_a_clean_answer(llm, call):
    kw = dict(max_new_tokens=30, temperature=1, seed=5, repetition_penalty=1e-45, response_format=DIGITS)
    if call == "generate":
        out = llm.generate("Hello", **kw)
    else:
        out = llm.chat([{"role": "user", "content": "Hello"}], **kw)
    assert out.text.startswith('"') and out.text[1:].isdigit() and len(out.token_ids) == 30
    assert out.finish_reason == "length"


def test_infinite_logits_share_the_probability_and_nan_is_never_chosen(llm):
    def two_infinite(ids, logits):
        x = logits.clone()
        x[:, 3] = NAN
        x[:, [7, 9]] = INF
        return x

    out = llm.generate([5, 6, 7], max_new_tokens=40, temperature=1.0, seed=0, ignore_eos=True, scorers=two_infinite)
    assert set(out.token_ids) == {7, 9}  # both, and only they
    out = llm.generate([5, 6, 7], max_new_tokens=4, temperature=0, ignore_eos=True, scorers=two_infinite)
    assert out.token_ids == [7] * 4


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_no_token_left_to_choose_is_a_typed_error(llm, temperature):
    with pytest.raises(InvalidRequestError, match="no token can be chosen"):
        llm.generate([5, 6, 7], max_new_tokens=4, temperature=temperature, seed=1,
                     scorers=lambda ids, logits: torch.full_like(logits, NAN))


def test_finite_choice_keeps_finite_rows_as_they_are():
    x = torch.tensor([[1.0, -INF, 3.0], [NAN, 2.0, -INF], [INF, 0.0, INF]])
    y = finite_choice(x)
    assert y[0].tolist() == [1.0, -INF, 3.0] and y[1].tolist() == [-INF, 2.0, -INF]
    assert y[2].tolist() == [0.0, -INF, 0.0]  # the +inf tokens share the probability
    assert draw(x, 0).tolist() == [2, 1, 0]


def test_extreme_options_on_extreme_logits_give_a_token_or_a_typed_error():
    """A seeded fuzz of the processor chain and the draw: any mix of the options' extremes over
    logits with huge values, inf and NaN yields a valid, non-NaN token or InvalidRequestError."""
    import random

    from slmkit.engine.processors import process

    rnd, V = random.Random(0), 50
    for it in range(1000):
        p = GeneratorParams(
            temperature=rnd.choice([0, 1e-45, 1e-6, 1e-5, 0.3, 1, 100]),
            repetition_penalty=rnd.choice([1.0, 1e-45, 1e-30, 0.5, 100]), top_k=rnd.choice([0, 1, 5]),
            top_p=rnd.choice([1.0, 0.5, 1e-9]), min_p=rnd.choice([0, 0.5, 1.0]), typical_p=rnd.choice([1.0, 0.5, 1e-9]),
            presence_penalty=rnd.choice([0, -2, 2]), frequency_penalty=rnd.choice([0, -2, 2]),
            no_repeat_ngram_size=rnd.choice([0, 1, 2]), logit_bias=rnd.choice([None, {1: 100, 2: -100}, {3: 100.0}]),
            min_new_tokens=rnd.choice([0, 5]))
        x = torch.randn(1, V) * rnd.choice([1, 1e3, 1e30, 3e38])
        for _ in range(rnd.randrange(3)):
            x[0, rnd.randrange(V)] = rnd.choice([INF, -INF, NAN])
        seq = [[rnd.randrange(V) for _ in range(rnd.randrange(1, 12))]]
        try:
            token = int(draw(process(x, p, seq, 1, [0]), p.temperature, torch.Generator().manual_seed(it)))
        except InvalidRequestError:
            continue
        assert 0 <= token < V and not bool(torch.isnan(x[0, token]))
