"""benchmarks/quality_fixtures.py: why the shipped weights favour llama.cpp's re-quantization, and
that the permuted fixture is the same model off that grid (on a tiny Gemma 3 stored as Q8_0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slmkit
from benchmarks.quality_fixtures import dither, permutation, quant_step, transformed_copy
from slmkit.gguf import open_gguf
from slmkit.quant.format import dequantize_weight, quantize
from tests.helpers.gguf_models import dequantized_copy, hf_to_gguf
from tests.helpers.tiny_models import make_gemma3_folder

PROMPT = list(range(5, 30))


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fair")
    # head_dim 64: permuting a head's value dimensions moves them across groups of 32, as the real
    # model's 256 do
    return hf_to_gguf(make_gemma3_folder(tmp / "hf", head_dim=64, query_pre_attn_scalar=64), tmp / "q8.gguf", "Q8_0")


def requant_error(w: torch.Tensor) -> float:
    """Largest error of int8 g32 absmax (Q8_0's own rule) re-quantizing w, relative to max |w|."""
    return ((dequantize_weight(quantize(w, 8, 32)) - w).abs().max() / w.abs().max()).item()


def test_permuted_copy_is_the_same_model_off_the_grid(q8_file, tmp_path):
    plain = dequantized_copy(q8_file, tmp_path / "f32.gguf")
    perm = transformed_copy(q8_file, tmp_path / "perm.gguf", permutation(open_gguf(q8_file).metadata, seed=1))
    a = slmkit.load(plain, dtype="float32").logits(PROMPT)
    b = slmkit.load(perm, dtype="float32").logits(PROMPT)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the same function
    fa, fb = open_gguf(plain), open_gguf(perm)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_output.weight", "blk.2.ffn_down.weight", "token_embd.weight"):
        w, wp = fa.tensor(name), fb.tensor(name)
        assert not torch.equal(w, wp)
        # the bias: the format's own quantizer lands back exactly on the dequantized weights...
        assert requant_error(w) < 1e-6, name
        # ...and not on the permuted ones, whose groups mix blocks of different scales
        assert requant_error(wp) > 1e-3, name


def test_permutation_refuses_a_tensor_it_has_no_rule_for(q8_file):
    apply = permutation(open_gguf(q8_file).metadata)
    with pytest.raises(ValueError, match="no exact permutation rule"):
        apply("blk.0.attn_qkv.weight", np.zeros((4, 64), np.float32))


def test_dither_stays_within_half_a_step_and_leaves_the_grid(q8_file):
    f = open_gguf(q8_file)
    name = "blk.1.ffn_up.weight"
    w = f.tensor(name).numpy()
    step = quant_step(w, "Q8_0")
    assert step is not None and quant_step(w, "F32") is None
    out = dither({name: "Q8_0"})(name, w)
    assert np.all(np.abs(out - w) <= step / 2 + 1e-7) and not np.array_equal(out, w)
    assert requant_error(torch.from_numpy(out)) > 1e-3
