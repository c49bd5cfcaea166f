"""Phi-3 parity with transformers' Phi3ForCausalLM on tiny random configs (same folder, fp32)."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import Generator, GeneratorParams
from slmkit.loading.packing import packing_available

ATOL = 1e-4


def hf_model(folder):
    from transformers import Phi3ForCausalLM

    return Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def ids_of(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("length", [20, 80])
def test_logits_match_transformers(phi3_folders, phi3_variant, length):
    folder = phi3_folders(phi3_variant)
    llm = slmkit.load(folder, dtype="float32")
    ref = hf_model(folder)
    ids = ids_of(length, llm.engine.vocab_size)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert ours.shape == (length, llm.engine.vocab_size) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= ATOL


def test_greedy_64_tokens_match_transformers_generate(phi3_folders, phi3_variant):
    folder = phi3_folders(phi3_variant)
    llm = slmkit.load(folder, dtype="float32")
    ref = hf_model(folder)
    ref.generation_config.eos_token_id = None  # run the full 64 tokens on both sides
    prompt = ids_of(20, llm.engine.vocab_size, seed=2)
    with torch.no_grad():
        x = torch.tensor([prompt])  # explicit mask: HF would otherwise mask any pad-id token in the prompt
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False)[0, 20:]
    theirs = theirs.tolist()
    out = llm.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True)
    assert len(set(theirs)) > 4, "degenerate reference output makes this test weak"
    assert out.token_ids == theirs
    assert out.finish_reason == "length" and out.usage.completion_tokens == 64


def test_cached_decode_equals_full_recompute(phi3_folders, phi3_variant):
    """Every step's cached logits equal a cache-free forward over the whole sequence; for the
    LongRoPE config the 20-token prompt crosses original_max (32) and the long regime is reached."""
    folder = phi3_folders(phi3_variant)
    llm = slmkit.load(folder, dtype="float32")
    gen = Generator(llm, GeneratorParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    gen.append_tokens(ids_of(20, llm.engine.vocab_size, seed=3))
    while not gen.is_done():
        full = llm.logits(gen.get_sequence(0))[-1]
        assert (gen.get_logits()[0] - full).abs().max().item() <= ATOL
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 50


def test_longrope_crossover_reprefills(phi3_folders):
    """At original_max + 1 tokens the short-factor cache is dropped and rebuilt with long factors."""
    folder = phi3_folders("longrope")
    llm = slmkit.load(folder, dtype="float32")
    gen = Generator(llm, GeneratorParams(temperature=0, ignore_eos=True))
    gen.append_tokens(ids_of(31, llm.engine.vocab_size, seed=4))
    assert gen.cache.tag == "short"
    gen.generate_next_token()  # 32 tokens: still short
    gen.get_logits()
    assert gen.cache.tag == "short" and gen.cache.offset == 32
    gen.generate_next_token()  # 33 tokens > 32: long, whole prefix recomputed
    logits = gen.get_logits()[0]
    assert gen.cache.tag == "long" and gen.cache.offset == 33
    # A cache that kept the short-rotated keys would give different logits:
    stale = llm.engine.new_cache(1, 64)
    seq = torch.tensor([gen.get_sequence(0)])
    llm.engine.forward(seq[:, :32], stale)
    mixed = llm.engine.forward(seq[:, 32:], stale)[0, -1]
    assert (mixed - logits).abs().max().item() > 1e-2
    ref = hf_model(folder)
    with torch.no_grad():
        theirs = ref(seq).logits[0, -1]
    assert (logits - theirs).abs().max().item() <= ATOL


def test_longrope_attention_scaling_applies_to_short_contexts(phi3_folders):
    """mscale = sqrt(1 + ln(1024/32)/ln(32)) multiplies cos/sin in the short regime too."""
    import math

    llm = slmkit.load(phi3_folders("longrope"), dtype="float32")
    rope = llm.engine.model.rope
    assert rope.scale == pytest.approx(math.sqrt(1 + math.log(1024 / 32) / math.log(32)))
    cos, _ = rope.cos_sin(torch.tensor([0]), "short", torch.float32)
    assert cos[0, 0].item() == pytest.approx(rope.scale)


def test_batch_rows_match_single_rows(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    a, b = ids_of(12, llm.engine.vocab_size, 5), ids_of(12, llm.engine.vocab_size, 6)
    gen = Generator(llm, GeneratorParams(max_new_tokens=8, batch_size=2, ignore_eos=True))
    gen.append_tokens([a, b])
    while not gen.is_done():
        gen.generate_next_token()
    for row, prompt in ((0, a), (1, b)):
        single = llm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)
        assert gen.get_sequence(row)[12:] == single.token_ids


def test_bfloat16_runs_close_to_float32(phi3_folders):
    folder = phi3_folders("gqa")
    f32 = slmkit.load(folder, dtype="float32")
    bf16 = slmkit.load(folder, dtype="bfloat16")
    plain = slmkit.load(folder, dtype="bfloat16", pack=False)  # the pure-PyTorch path
    assert plain.engine.packed_linears == 0 and plain.engine.model.lm_head.weight.dtype == torch.bfloat16
    if packing_available():
        assert bf16.engine.packed_linears == 3 * 4 + 1  # 4 per layer + lm_head
    ids = ids_of(16, f32.engine.vocab_size, 7)
    a, b, c = f32.logits(ids), bf16.logits(ids), plain.logits(ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
    assert (c - b).abs().max().item() < 0.02 * a.abs().max().item()
    # the single-row GEMV decode path agrees with the batched path
    gen = Generator(bf16, GeneratorParams(max_new_tokens=4, ignore_eos=True))
    gen.append_tokens(ids)
    gen.generate_next_token()
    step = gen.get_logits()[0]
    full = bf16.logits(gen.get_sequence(0))[-1]
    assert (step - full).abs().max().item() < 0.05 * full.abs().max().item()


def test_a_pass_says_where_its_tokens_sit_by_type_not_by_a_none_offset():
    """KVCache rows share one length (Aligned); SlotCache rows each have their own (Ragged)."""
    import torch

    from slmkit.models.cache import Aligned, KVCache, Ragged, SlotCache, Step

    kv = KVCache(1, 2, 1, 4, 8, max_capacity=8, dtype=torch.float32)
    kv.offset = 3
    span = Step.of(kv, 2, torch.device("cpu")).span
    assert isinstance(span, Aligned) and span.offset == 3 and span.positions.tolist() == [[3, 4]]
    slots = SlotCache(1, 3, 1, 4, 8, dtype=torch.float32)
    slots.add_row(), slots.add_row()
    slots.lens[:2] = torch.tensor([5, 1])
    span = Step.of(slots, 1, torch.device("cpu")).span
    assert isinstance(span, Ragged) and span.positions.tolist() == [[5], [1]]
    assert not hasattr(slots, "offset")
    span = Step.of(None, 3, torch.device("cpu")).span
    assert isinstance(span, Aligned) and span.offset == 0 and span.positions.tolist() == [[0, 1, 2]]
