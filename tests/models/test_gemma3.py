"""Gemma 3 text parity with transformers' Gemma3ForCausalLM on a tiny random config (fp32)."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import Generator, GeneratorParams
from tests.helpers.tiny_models import make_gemma3_folder

ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("gemma3"))


def hf(folder):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def ids_of(n, vocab, seed=1):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("length", [5, 40])  # 40 > sliding window 8: local layers mask the far past
def test_logits_match_transformers(folder, length):
    llm = slmkit.load(folder, dtype="float32")
    ids = ids_of(length, llm.engine.vocab_size)
    with torch.no_grad():
        theirs = hf(folder)(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - theirs).abs().max().item() <= ATOL


def test_greedy_matches_transformers_generate(folder):
    llm = slmkit.load(folder, dtype="float32")
    ref = hf(folder)
    ref.generation_config.eos_token_id = None
    prompt = ids_of(12, llm.engine.vocab_size, seed=2)
    x = torch.tensor([prompt])
    with torch.no_grad():
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False)[0, 12:]
    out = llm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert len(set(theirs.tolist())) > 4 and out == theirs.tolist()


def test_cached_decode_equals_full_recompute(folder):
    llm = slmkit.load(folder, dtype="float32")
    gen = Generator(llm, GeneratorParams(max_new_tokens=20, ignore_eos=True))
    gen.append_tokens(ids_of(6, llm.engine.vocab_size, seed=3))
    while not gen.is_done():
        assert (gen.get_logits()[0] - llm.logits(gen.get_sequence(0))[-1]).abs().max().item() <= ATOL
        gen.generate_next_token()


def test_tied_embeddings_share_storage(folder):
    llm = slmkit.load(folder, dtype="float32")
    m = llm.engine.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_bfloat16_packed_close(folder):
    f32, bf16 = slmkit.load(folder, dtype="float32"), slmkit.load(folder, dtype="bfloat16")
    ids = ids_of(10, f32.engine.vocab_size, 4)
    a, b = f32.logits(ids), bf16.logits(ids)
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
