"""Real weights: the built-in Gemma 3 270M GGUF against llama.cpp, over a fixed 512-token English text.

1. The same weights in float on both sides (the file's tensors dequantized -- bit-exact with
   gguf.quants, tests/gguf/test_quants.py -- and written as an F32 GGUF with the file's metadata):
   top-1 next-token agreement >= 99% and perplexity within 1%. This pins the architecture, the
   GGUF name/metadata mapping and the tokenizer on real weights.
2. The Q4_K_M file itself, run in its own blocks by our int4/int8 kernel (slmkit.quant): perplexity
   within 1% of llama.cpp's. Top-1 agreement is lower here (~95%): both sides quantize
   activations to 8 bits, but differently (llama.cpp: Q8_K per 256 for K-quants, round half away
   from zero; we: per 32/16-input group, round half to even); near-ties flip. The bound asserted
   is the measured one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import slmkit

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to build "
    "a machine that a person could ride without a horse. The first design, called the running machine, had two "
    "wheels in a line and a wooden frame, but no pedals: the rider pushed the ground with his feet. Later, "
    "mechanics in France added pedals to the front wheel, and the machine became faster, although it was still "
    "heavy and uncomfortable on the rough roads of the time. In the eighteen seventies the high wheel bicycle "
    "appeared. Its front wheel was very large, because each turn of the pedals moved the rider a long distance. "
    "It was fast, but it was also dangerous, and many riders fell from a great height. The safety bicycle, which "
    "came a few years later, solved this problem with two wheels of the same size and a chain that drove the "
    "rear wheel. Air filled tires made the ride softer, and soon millions of people used bicycles to travel to "
    "work, to visit friends, and to explore the countryside. Today the bicycle is one of the most efficient "
    "machines ever built. A rider uses less energy to travel one kilometre than a person who walks, and the "
    "bicycle produces no pollution at all. Cities around the world build special lanes for cyclists, and many "
    "people see the bicycle as an important part of a healthy and sustainable future. Engineers continue to "
    "improve the design, with light frames of carbon fibre, electric motors that help on steep hills, and gears "
    "that make it easy to climb. Yet the basic idea has not changed in more than a hundred years: two wheels, a "
    "frame, pedals and a chain. Children still learn to ride in the park, with a parent running beside them, and "
    "the moment when they first keep their balance alone is a memory that many people keep for the rest of their "
    "lives. Some people ride for sport and race over mountains or across whole countries, while others simply "
    "enjoy a quiet trip along a river on a summer evening. Whatever the reason, the bicycle remains a simple, "
    "practical and joyful invention that has changed the way we move through the world. "
    "Bread is another simple thing with a long history. People in ancient Egypt mixed flour and water, left the "
    "dough in the warm air, and noticed that it grew and became light. They had discovered yeast, although they "
    "did not know what it was. For thousands of years bakers kept a piece of old dough to start the next batch, "
    "and some families passed the same starter from parent to child. In the villages of Europe the baker was an "
    "important person, and the smell of fresh bread in the early morning was a sign that the day had begun. "
    "Modern factories now make most of the bread that we buy, but many people still bake at home, because they "
    "enjoy the work and the taste of a loaf that comes straight from their own oven."
)
N = 512


@pytest.fixture(scope="module")
def builtin():
    from slmkit.sources.builtin import builtin_model_path

    return builtin_model_path()


def _ppl_and_top1(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    x = torch.from_numpy(np.asarray(logits, dtype=np.float32))[:-1]
    logp = torch.log_softmax(x, dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(nll.mean().item()), x.argmax(-1).numpy()


@pytest.fixture(scope="module")
def builtin_f32(builtin, tmp_path_factory):
    """The built-in file with every tensor dequantized to F32 (same metadata)."""
    from tests.helpers.gguf_models import dequantized_copy

    return dequantized_copy(builtin, tmp_path_factory.mktemp("f32") / "gemma-3-270m-f32.gguf")


def compare(path) -> tuple[float, float, float]:
    llm = slmkit.load(path, dtype="float32")
    ids = llm.tokenizer.encode(TEXT)
    assert ids[0] == llm.tokenizer.bos_token_id and len(ids) >= N, len(ids)
    ids = ids[:N]
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=N + 16, n_batch=N, logits_all=True, n_threads=2,
                          verbose=False)
    assert ref.tokenize(TEXT.encode(), add_bos=True, special=True)[:N] == ids  # same tokenizer
    ref.eval(ids)
    ppl_ours, top_ours = _ppl_and_top1(llm.logits(ids).numpy(), ids)
    ppl_theirs, top_theirs = _ppl_and_top1(np.array(ref.scores[:N]), ids)
    agree = float((top_ours == top_theirs).mean())
    print(f"{path.name}: perplexity ours {ppl_ours:.3f} llama.cpp {ppl_theirs:.3f}; top-1 agreement {agree:.4f}")
    assert ppl_ours < 30  # a real model on plain English, not noise
    return ppl_ours, ppl_theirs, agree


def test_same_float_weights_match_llama_cpp(builtin_f32):
    ppl_ours, ppl_theirs, agree = compare(builtin_f32)
    assert agree >= 0.99
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs <= 0.01


def test_q4_k_m_file_perplexity_matches_llama_cpp(builtin):
    ppl_ours, ppl_theirs, agree = compare(builtin)
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs <= 0.01
    assert agree >= 0.93
