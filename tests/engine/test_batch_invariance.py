"""Greedy decoding is batch-invariant: a request gives the same tokens, and the same logits to the
last bit, alone, in a batch of 2, 4 or 16, prefilled in chunks, or starting from a prefix a finished
request left in its slot. Checked on the built-in model (real weights, where near-ties are common)
and on tiny random models through the float (float32, bfloat16) and quantized (int8, int4) paths."""
from __future__ import annotations

import threading

import pytest
import torch

import slmkit
from slmkit.engine.batching import BatchEngine
from slmkit.engine.generator import Generator, GeneratorParams
from slmkit.kernels.qgemm import get_kernel
from tests.helpers.tiny_models import make_gemma3_folder

pytestmark = [pytest.mark.skipif(get_kernel() is None, reason="batch invariance needs the compiled kernels"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)

Run = list[tuple[int, float]]  # (token, its log-probability) per step


def solo(engine, prompt: list[int], new: int) -> Run:
    gen = Generator(engine, GeneratorParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append((gen.get_next_tokens()[0], gen.last_logprobs[0][1]))
    return out


def batched(batch: BatchEngine, reqs: list[tuple[list[int], int]]) -> list[Run]:
    """Submit every request from its own thread; the engine starts once all are queued, so the
    requests share steps (and prefill chunks) from the first one."""
    got: list = [None] * len(reqs)

    def run(i: int) -> None:
        prompt, new = reqs[i]
        params = GeneratorParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        got[i] = [(t, lp[1]) for t, _, lp in batch.submit(prompt, params, want_logprobs=True)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    if not batch._thread.is_alive():
        while batch.incoming.qsize() < len(reqs):
            threading.Event().wait(0.01)
        batch.start()
    for t in threads:
        t.join(timeout=300)
    return got


def check(engine, reqs: list[tuple[list[int], int]], sizes: tuple[int, ...], chunk: int) -> BatchEngine:
    """Each request alone, then batches of each size (slots = size): equal runs, bit for bit."""
    want = [solo(engine, p, n) for p, n in reqs]
    assert len({t for run in want for t, _ in run}) > 3  # real text, not one repeated token
    batch = None
    for size in sizes:
        batch = BatchEngine(engine, slots=size, slot_context=256, prefill_chunk=chunk, start=False)
        got = batched(batch, reqs)
        batch.close()
        for i, (g, w) in enumerate(zip(got, want)):
            where = f"request {i} in a batch of {size}"
            assert [t for t, _ in g] == [t for t, _ in w], f"{where}: other tokens than its solo run"
            assert g == w, f"{where}: same tokens as its solo run, other logits"
    return batch


@pytest.fixture(scope="module")
def builtin(kernel_variant):
    return slmkit.load("builtin")  # its Q4_K_M blocks through the quantized kernel


@pytest.fixture(scope="module")
def builtin_float(kernel_variant):
    return slmkit.load("builtin", quant="none")  # dequantized: the float kernel


@pytest.mark.parametrize("path", ["quantized", "float"])
def test_builtin_greedy_rows_equal_their_solo_runs(request, path):
    builtin = request.getfixturevalue("builtin" if path == "quantized" else "builtin_float")
    tok = builtin.engine.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by",
             "1, 1, 2, 3, 5, 8,", "The mitochondria is the", "Water boils at a temperature of",
             "In 1492, Columbus", "The quick brown fox"]
    chats = [builtin.render([{"role": "user", "content": c}]).text
             for c in ("Name three colors.", "What is 2 + 2?", "Write a haiku about rain.")]
    prompts = [tok.encode(t) for t in texts] + [tok.encode(c, add_special_tokens=False) for c in chats]
    reqs = [(p, 6 + i % 4) for i, p in enumerate(prompts)]
    # a prefill chunk of 8 tokens splits most prompts, at places that depend on what else is joining
    check(builtin.engine, reqs, (1, 4, 16), chunk=8)


def test_builtin_prefix_reuse_and_follow_up_turns_equal_solo_runs(builtin):
    """A finished request's slot keeps its keys; a follow-up (the conversation so far and a new
    turn) starts from them. Its tokens must equal a fresh solo run of the whole prompt."""
    engine, tok = builtin.engine, builtin.engine.tokenizer
    system = tok.encode("You are a terse assistant. Answer in one short sentence, in English, please.")
    firsts = [system + tok.encode(q, add_special_tokens=False) for q in (" Sky colour?", " Grass colour?")]
    batch = BatchEngine(engine, slots=4, slot_context=256, prefill_chunk=16, start=False)
    first_runs = batched(batch, [(p, 8) for p in firsts])
    assert first_runs == [solo(engine, p, 8) for p in firsts]
    follow = [p + [t for t, _ in run] + tok.encode(" And snow?", add_special_tokens=False)
              for p, run in zip(firsts, first_runs)]
    reqs = [(p, 8) for p in follow] + [(system + tok.encode(" Sea colour?", add_special_tokens=False), 8)]
    before = batch.reused_tokens
    got = batched(batch, reqs)
    assert batch.reused_tokens - before >= 2 * len(system)  # the follow-ups started from kept keys
    batch.close()
    assert got == [solo(engine, p, n) for p, n in reqs]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("g3-invariance"), num_hidden_layers=3,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.mark.parametrize("dtype,quant", [("float32", None), ("bfloat16", None), ("float32", "int8"),
                                         ("bfloat16", "int4")])
@pytest.mark.parametrize("kind", ["phi3", "gemma3"])
def test_tiny_models_greedy_rows_equal_solo_on_every_path(phi3_folders, tiny_gemma, kind, dtype, quant):
    folder = phi3_folders("gqa") if kind == "phi3" else tiny_gemma
    llm = slmkit.load(folder, dtype=dtype, quant=quant)
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(5, llm.engine.vocab_size, (3 + 5 * i % 23,), generator=g).tolist(), 6 + i % 5)
            for i in range(16)]
    check(llm.engine, reqs, (2, 16), chunk=8)


def test_longrope_rows_crossing_original_max_equal_solo(phi3_folders):
    """Phi-3 LongRoPE (original_max 32 here): a row that grows past it is re-prefilled with the
    long factors in its slot, as a solo run re-prefills its cache; both must give the same bits."""
    llm = slmkit.load(phi3_folders("longrope"), dtype="bfloat16")
    g = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(5, llm.engine.vocab_size, (n,), generator=g).tolist(), m)
            for n, m in [(20, 16), (28, 8), (40, 6), (10, 30), (31, 4), (33, 5)]]
    check(llm.engine, reqs, (2, 6), chunk=8)
