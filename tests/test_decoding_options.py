"""Decoding options through the API: penalties against transformers' generate, logprobs, logit_bias,
min_new_tokens, custom scorers, and typed errors for bad options."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import InvalidRequestError

PROMPT = [5, 9, 14, 22, 9, 14, 31, 40]


@pytest.fixture(scope="module")
def tiny(phi3_folders):
    folder = phi3_folders("gqa")
    return folder, slmkit.load(folder, dtype="float32")


def hf_greedy(folder, n: int, **kw) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2},
                                {"repetition_penalty": 0.7, "no_repeat_ngram_size": 3}])
def test_penalised_greedy_matches_transformers(tiny, kw):
    folder, llm = tiny
    ours = llm.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True, **kw).token_ids
    assert ours == hf_greedy(folder, 24, **kw)
    assert ours != llm.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids


def test_logprobs_are_the_models_and_top_is_sorted(tiny):
    _, llm = tiny
    out = llm.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True, top_logprobs=5)
    assert out.logprobs is not None and [lp.token_id for lp in out.logprobs] == out.token_ids
    full = torch.log_softmax(llm.logits(PROMPT + out.token_ids), dim=-1)
    for i, lp in enumerate(out.logprobs):
        want = full[len(PROMPT) - 1 + i]
        assert abs(lp.logprob - want[lp.token_id].item()) < 1e-4
        assert [t.token_id for t in lp.top_logprobs] == want.topk(5).indices.tolist()
        assert lp.top_logprobs[0].token_id == lp.token_id  # greedy picks the most likely
        assert lp.token == llm.tokenizer.decode([lp.token_id], skip_special_tokens=False)
    assert llm.generate(PROMPT, max_new_tokens=2, temperature=0).logprobs is None
    chunks = list(llm.generate(PROMPT, max_new_tokens=3, temperature=0, ignore_eos=True, logprobs=True,
                               stream=True))
    assert [c.logprobs[0].token_id for c in chunks] == [c.token_ids[0] for c in chunks]
    assert all(c.logprobs[0].top_logprobs == [] for c in chunks)


def test_logit_bias_by_id_and_by_text(tiny):
    _, llm = tiny
    target = 77
    out = llm.generate(PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True, logit_bias={target: 100})
    assert out.token_ids == [target] * 5
    assert llm.generate(PROMPT, max_new_tokens=5, temperature=0.9, seed=3, ignore_eos=True,
                        logit_bias={str(target): 100}).token_ids == [target] * 5
    text = "hello"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    out = llm.generate(PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True, logit_bias={text: -100})
    assert not set(out.token_ids) & set(ids)


def test_min_new_tokens_holds_back_the_end(tiny):
    _, llm = tiny
    eos = min(llm.engine.eos_token_ids)
    out = llm.generate(PROMPT, max_new_tokens=20, temperature=0, logit_bias={eos: 100})
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = llm.generate(PROMPT, max_new_tokens=20, temperature=0, logit_bias={eos: 100}, min_new_tokens=4)
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]


def test_custom_scorer_sees_the_sequence_and_steers(tiny):
    _, llm = tiny
    seen = []

    def force_next_of_last(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape)
        out = torch.full_like(logits, -1e9)
        out[:, (ids[:, -1] + 1) % logits.shape[-1]] = 0
        return out

    out = llm.generate(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True, scorers=[force_next_of_last])
    assert out.token_ids == [41, 42, 43, 44]
    assert seen[0] == (1, len(PROMPT)) and seen[-1] == (1, len(PROMPT) + 3)


def test_presence_and_frequency_penalties_reduce_repeats(tiny):
    _, llm = tiny
    plain = llm.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    pen = llm.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                       presence_penalty=2.0).token_ids
    assert len(set(pen)) > len(set(plain))


def test_sampling_filters_and_seed(tiny):
    _, llm = tiny
    kw = dict(max_new_tokens=16, temperature=1.0, ignore_eos=True, min_p=0.05, typical_p=0.9, seed=11)
    a, b = llm.generate(PROMPT, **kw).token_ids, llm.generate(PROMPT, **kw).token_ids
    assert a == b
    assert llm.generate(PROMPT, **{**kw, "seed": 12}).token_ids != a


@pytest.mark.parametrize("kw,param", [
    ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"), ({"min_p": 2}, "min_p"),
    ({"typical_p": 0}, "typical_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"top_logprobs": 50}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs"), ({"beam_width": 4}, "beam_width"),
    ({"logit_bias": {10 ** 9: 1}}, "logit_bias"), ({"logit_bias": {5: 1000}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"scorers": [42]}, "scorers"), ({"min_new_tokens": 1.5}, "min_new_tokens"),
])
def test_bad_options_are_named(tiny, kw, param):
    _, llm = tiny
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPT, max_new_tokens=2, **kw)
    assert e.value.param == param
    with pytest.raises(InvalidRequestError):
        llm.generate(PROMPT, max_new_tokens=2, stream=True, **kw)  # refused at the call, not mid-stream


def test_n_samples_share_the_prompt_and_follow_their_seeds(tiny):
    _, llm = tiny
    outs = llm.generate(PROMPT, n=3, max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    assert len(outs) == 3 and len({tuple(o.token_ids) for o in outs}) > 1
    for i, o in enumerate(outs):  # sample i is the seed + i sample
        assert o.token_ids == llm.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=5 + i,
                                           ignore_eos=True).token_ids
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPT, n=0)
    assert e.value.param == "n"


def forced(ids_to_emit: list[int]):
    """A scorer that makes the model say exactly ids_to_emit (then anything)."""
    state = {"i": 0}

    def scorer(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        i = state["i"]
        state["i"] += 1
        if i >= len(ids_to_emit):
            return logits
        out = torch.full_like(logits, -1e9)
        out[:, ids_to_emit[i]] = 0
        return out

    return scorer


@pytest.mark.parametrize("text,stop,want", [
    ("你好世界，再见", "世界", "你好"),  # CJK through byte-fallback pieces, the stop split across tokens
    ("Hello world", "He", ""),  # a stop string inside the very first token
    ("a### b", "###", "a"),
])
def test_stop_strings_split_across_tokens_and_in_the_first_token(tiny, text, stop, want):
    _, llm = tiny
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    kw = dict(max_new_tokens=len(ids) + 2, temperature=0, ignore_eos=True, stop=stop)
    out = llm.generate(PROMPT, scorers=[forced(ids)], **kw)
    assert out.text == want and out.finish_reason == "stop"
    streamed = "".join(c.text for c in llm.generate(PROMPT, stream=True, scorers=[forced(ids)], **kw))
    assert streamed == want
