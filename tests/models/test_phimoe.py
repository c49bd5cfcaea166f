"""Phi-3.5-MoE parity with transformers' PhimoeForCausalLM on tiny random configs (fp32).

transformers 5.24 computes the rotary frequencies with `rope_init_fn(config)` and no seq_len, so
past original_max it takes long_mscale but keeps the SHORT factors (long_factor changes nothing).
The checkpoint's own code, older transformers and the spec use the long factors there; the
reference below has that one computation corrected (`_corrected_rotary`), and
`test_transformers_524_ignores_long_factor` shows the difference.
"""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import Generator, GeneratorParams
from slmkit.models.phimoe import sparsemixer
from tests.helpers.tiny_models import make_phimoe_folder

ATOL = 1e-4
ORIG = 32  # original_max_position_embeddings of the LongRoPE config
HALF = 8  # head_dim 16 / 2 factors


def longrope(short_mscale: float = 1.1, long_mscale: float = 1.3) -> dict:
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIG,
            "short_factor": [1.0 + 0.1 * i for i in range(HALF)], "long_factor": [2.0 + 0.7 * i for i in range(HALF)],
            "short_mscale": short_mscale, "long_mscale": long_mscale}


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return make_phimoe_folder(tmp_path_factory.mktemp("moe") / "m", num_local_experts=6, attention_bias=True,
                              lm_head_bias=True, rope_parameters=longrope(), max_position_embeddings=256)


def _corrected_rotary(self, x, position_ids=None):
    """PhimoeRotaryEmbedding.forward with the frequencies of the current length (long factors
    past original_max), as the checkpoint's code computes them."""
    rp = self.config.rope_parameters
    seq_len = int(position_ids.max()) + 1
    mscale = rp["long_mscale"] if seq_len > rp["original_max_position_embeddings"] else rp["short_mscale"]
    inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len)
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)


def hf_model(folder, *, corrected: bool = True, monkeypatch=None):
    from transformers import PhimoeForCausalLM
    from transformers.models.phimoe import modeling_phimoe

    if corrected:
        assert monkeypatch is not None
        monkeypatch.setattr(modeling_phimoe.PhimoeRotaryEmbedding, "forward", _corrected_rotary)
    return PhimoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ids_of(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("length", [20, ORIG, ORIG + 1, 70])
def test_logits_match_transformers_below_and_above_original_max(moe_folder, monkeypatch, length):
    llm = slmkit.load(moe_folder, dtype="float32")
    ref = hf_model(moe_folder, monkeypatch=monkeypatch)
    ids = ids_of(length, llm.engine.vocab_size)
    ours = llm.logits(ids)
    assert ours.shape == (length, llm.engine.vocab_size)
    assert (ours - ref_logits(ref, ids)).abs().max().item() <= ATOL


def test_transformers_524_ignores_long_factor(moe_folder, monkeypatch):
    """Unpatched, transformers gives the same logits past original_max whatever long_factor is
    (the bug); corrected, and ours, they differ from those by far more than the tolerance."""
    llm = slmkit.load(moe_folder, dtype="float32")
    ids = ids_of(60, llm.engine.vocab_size, seed=7)
    buggy = ref_logits(hf_model(moe_folder, corrected=False), ids)
    other = hf_model(moe_folder, corrected=False)
    other.config.rope_parameters["long_factor"] = [9.0] * HALF
    assert (ref_logits(other, ids) - buggy).abs().max().item() == 0.0  # long_factor is ignored
    ours = llm.logits(ids)
    assert (ours - buggy).abs().max().item() > 100 * ATOL
    assert (ours - ref_logits(hf_model(moe_folder, monkeypatch=monkeypatch), ids)).abs().max().item() <= ATOL


def test_greedy_64_tokens_across_the_crossover(moe_folder, monkeypatch):
    """20-token prompt, 64 greedy tokens: crosses original_max (32) at the 33rd token. The step-by-step
    reference (a full forward per step) in two passes: causal attention makes position n-1 of one
    pass over the first 32 tokens (short regime) what a pass over n <= 32 tokens gives there, and of
    one pass over all of them (long regime) what a pass over n > 32 tokens gives."""
    llm = slmkit.load(moe_folder, dtype="float32")
    ref = hf_model(moe_folder, monkeypatch=monkeypatch)
    prompt = ids_of(20, llm.engine.vocab_size, seed=2)
    out = llm.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    seq = prompt + out
    short, long = ref_logits(ref, seq[:ORIG]), ref_logits(ref, seq[:-1])
    theirs = [int((short if n <= ORIG else long)[n - 1].argmax()) for n in range(20, len(seq))]
    assert len(set(out)) > 4, "degenerate output makes this test weak"
    assert out == theirs


def test_cached_decode_equals_full_recompute(moe_folder):
    llm = slmkit.load(moe_folder, dtype="float32")
    gen = Generator(llm, GeneratorParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    gen.append_tokens(ids_of(25, llm.engine.vocab_size, seed=3))
    while not gen.is_done():
        full = llm.logits(gen.get_sequence(0))[-1]
        assert (gen.get_logits()[0] - full).abs().max().item() <= ATOL
        gen.generate_next_token()
    assert gen.cache.tag == "long"


def test_router_decisions_equal_the_reference_router(moe_folder):
    """Same hidden states into both routers: identical expert ids and weights, every layer."""
    llm = slmkit.load(moe_folder, dtype="float32")
    ref = hf_model(moe_folder, corrected=False)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(3))
    for ours_layer, ref_layer in zip(llm.engine.model.model.layers, ref.model.layers):
        ids, w = ours_layer.block_sparse_moe.route(x)
        with torch.no_grad():
            _, rw, rids = ref_layer.mlp.router(x)
        assert torch.equal(ids, rids) and torch.equal(w, rw)
        assert len(ids.unique()) == 6


def test_near_ties_at_the_threshold_route_like_the_reference():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as ref_mixer

    eps = 0.01
    base = torch.tensor([1.0, 0.5, -0.3, 0.2])
    rows = [base]
    for gap in (2 * eps - 1e-6, 2 * eps, 2 * eps + 1e-6, 0.0, 1e-7):
        rows.append(torch.tensor([1.0, 1.0 - gap, 1.0 - 2 * gap, -1.0]))  # relative gaps right at 2*eps
        rows.append(torch.tensor([-1.0, -1.0 - gap, 3.0, 3.0 - 3 * gap]))
    scores = torch.stack(rows)
    ids, w = sparsemixer(scores, eps)
    rw, rids = ref_mixer(scores, jitter_eps=eps, training=False)
    assert torch.equal(ids, rids) and torch.equal(w, rw)
    # by hand: [1, .985, .97, -1] -> top-1 softmax over {1, .985} (.97 is 3% away), top-2 over {.985, .97}
    ids, w = sparsemixer(torch.tensor([[1.0, 0.985, 0.97, -1.0]]), eps)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(w[0, 0], torch.tensor([1.0, 0.985]).softmax(0)[0])
    assert torch.allclose(w[0, 1], torch.tensor([0.985, 0.97]).softmax(0)[0])
    assert w.sum() < 1.5  # not renormalised


def test_batched_rows_choosing_different_experts_equal_solo_runs(moe_folder):
    llm = slmkit.load(moe_folder, dtype="float32")
    reqs = [ids_of(8 + 3 * i, llm.engine.vocab_size, seed=10 + i) for i in range(3)]
    solo = [llm.generate(p, max_new_tokens=10, temperature=0, ignore_eos=True).token_ids for p in reqs]
    gen = Generator(llm, GeneratorParams(max_new_tokens=10, batch_size=2, ignore_eos=True))
    trace = llm.engine.model.routing
    trace.keep_passes = True
    gen.append_tokens([reqs[0], reqs[0][:2] + reqs[1][2:8]])
    gen.get_logits()
    last = trace.passes[-1][0][0]  # layer 0, the prompt pass: [B, S, 2]
    assert not torch.equal(last[0, -1], last[1, -1])  # the rows' last tokens chose different experts
    trace.keep_passes = False
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.get_sequence(0)[8:] == solo[0]
    import threading

    llm.enable_batching(slots=3, context=128)
    got: list = [None] * 3

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i], max_new_tokens=10, temperature=0, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo


def test_decode_step_dispatch_equals_the_grouped_path_in_bfloat16(moe_folder):
    """A one-token step runs its two experts directly; in bf16 that gives the grouped path's bits
    (zeros, then each chosen expert's weighted output added in ascending expert id)."""
    llm = slmkit.load(moe_folder, dtype="bfloat16")
    moe = llm.engine.model.model.layers[0].block_sparse_moe
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        x = (torch.randn(1, 1, moe.gate.weight.shape[1], generator=g) * 3).to(torch.bfloat16)
        ids, weights = moe.route(x.view(1, -1))
        ref = torch.zeros_like(x.view(1, -1))
        for e in sorted(ids[0].tolist()):
            slot = ids[0].tolist().index(e)
            ref.index_add_(0, torch.tensor([0]), (moe.experts[e](x.view(1, -1)) * weights[:, slot, None]).to(ref.dtype))
        assert torch.equal(moe(x, None), ref.view(1, 1, -1))
        assert ids[0, 0] != ids[0, 1]
