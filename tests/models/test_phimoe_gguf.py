"""Phi-3.5-MoE as GGUF (llama.cpp's converter layout: stacked ffn_*_exps experts, F32 router, an
attn_factor instead of the mscale values): it runs with our SparseMixer routing and the
checkpoint's mscale, so it gives the reference's logits, not llama.cpp's."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.models.phimoe import PHI35_MOE_MSCALE
from slmkit.quant.linear import QuantLinear
from tests.helpers.gguf_models import dequantized_copy, hf_to_gguf
from tests.helpers.tiny_models import make_phimoe_folder
from tests.models.test_phimoe import hf_model, ids_of, ref_logits

HALF = 32  # head_dim 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.05 * i for i in range(HALF)], "long_factor": [1.5 + 0.3 * i for i in range(HALF)],
            "short_mscale": PHI35_MOE_MSCALE, "long_mscale": PHI35_MOE_MSCALE}  # as the real config.json
    return make_phimoe_folder(tmp_path_factory.mktemp("moeg") / "m", hidden_size=256, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=True, lm_head_bias=True,
                              rope_parameters=rope, max_position_embeddings=256)


@pytest.mark.parametrize("length", [20, 45])
def test_f32_gguf_matches_the_reference(folder, tmp_path, monkeypatch, length):
    llm = slmkit.load(hf_to_gguf(folder, tmp_path / "f32.gguf"), dtype="float32")
    ids = ids_of(length, llm.engine.vocab_size, seed=4)
    theirs = ref_logits(hf_model(folder, monkeypatch=monkeypatch), ids)
    assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4


def test_quantized_mix_runs_experts_in_the_kernel_and_matches_its_dequantized_copy(folder, tmp_path):
    """Attention Q8_0, experts Q4_K (random valid blocks: gguf-py has no K-quantizer; repacked
    losslessly into an int4 QuantLinear per expert), router F32: close to the F32 file of the same
    values, same greedy tokens."""
    path = hf_to_gguf(folder, tmp_path / "mix.gguf", "Q8_0", expert_qtype="Q4_K")
    llm = slmkit.load(path, dtype="float32")
    model = llm.engine.model
    moe = model.model.layers[0].block_sparse_moe
    assert all(isinstance(getattr(e, w), QuantLinear) for e in moe.experts for w in ("w1", "w2", "w3"))
    assert moe.experts[0].w1.bits == 4 and not isinstance(moe.gate, QuantLinear)
    exact = slmkit.load(dequantized_copy(path, tmp_path / "deq.gguf"), dtype="float32")
    ids = ids_of(40, llm.engine.vocab_size, seed=6)
    ours, ref = llm.logits(ids), exact.logits(ids)
    # the kernel's rounding can flip a near-tie routing decision at some position (then that
    # position differs by a whole expert); everywhere else it is a quantization-size difference
    close = (ours - ref).abs().amax(-1) <= 0.05 * ref.abs().max()  # (activations run in int8)
    assert close.float().mean().item() >= 0.85
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_a_quantized_router_is_dequantized_not_run_quantized(folder, tmp_path):
    path = hf_to_gguf(folder, tmp_path / "r.gguf", "F32", router_qtype="Q8_0")
    llm = slmkit.load(path, dtype="float32")
    gate = llm.engine.model.model.layers[0].block_sparse_moe.gate
    assert not isinstance(gate, QuantLinear) and gate.weight.dtype.is_floating_point
    exact = slmkit.load(dequantized_copy(path, tmp_path / "rd.gguf"), dtype="float32")
    ids = ids_of(30, llm.engine.vocab_size, seed=8)
    assert torch.equal(llm.logits(ids), exact.logits(ids))
