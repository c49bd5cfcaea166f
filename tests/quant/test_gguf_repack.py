"""slmkit.quant.gguf_repack: GGUF blocks -> QuantWeight, bit-exact against slmkit.gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.gguf.quants import SUPPORTED_TYPES, dequantize
from slmkit.quant.format import (
    QuantWeight,
    dequantize_weight,
    qmatmul_reference,
    quantize_activations,
    unpack_codes,
)
from slmkit.quant.gguf_repack import REPACKABLE, repack
from tests.helpers.gguf_files import block_sizes, has_reference_quantizer, qtype, quantize, random_blocks

HANDLED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = [(16, 256), (40, 512), (33, 768), (1, 256)]
# (bits, group, zero, scale dtype, has mins) per type
LAYOUT = {
    "Q4_0": (4, 32, 8, torch.float16, False), "Q4_1": (4, 32, 0, torch.float16, True),
    "Q5_0": (8, 32, 16, torch.float16, False), "Q5_1": (8, 32, 0, torch.float16, True),
    "Q8_0": (8, 32, 128, torch.float16, False), "Q4_K": (4, 32, 0, torch.uint8, True),
    "Q5_K": (8, 32, 0, torch.uint8, True), "Q6_K": (8, 16, 32, torch.int8, False),
}
# K-quants keep their two levels: integer sub-scales x a float32 super-scale per 256 inputs
SUPER = {"Q4_K": 8, "Q5_K": 8, "Q6_K": 16}


def _raw(type_name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    raw = random_blocks(type_name, shape, np.random.default_rng(seed))
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).copy())


def _check_exact(raw: torch.Tensor, type_name: str, shape: tuple[int, int], **kw: int) -> QuantWeight:
    tid = int(qtype(type_name))
    qw = repack(raw, tid, shape, **kw)
    assert qw is not None
    bits, group, zero, dtype, has_min = LAYOUT[type_name]
    assert (qw.bits, qw.group, qw.zero, qw.n, qw.k) == (bits, group, zero, *shape)
    assert qw.scales.dtype == dtype and (qw.mins is not None) == has_min
    assert qw.mins is None or qw.mins.dtype == dtype
    assert qw.per_super == SUPER.get(type_name, 1) and (qw.super_scales is not None) == (type_name in SUPER)
    if bits == 4 or type_name == "Q8_0":  # 4-bit codes and Q8_0 cost what the file costs (rows padded to
        # 16); Q4_K's 6-bit sub-scales and float16 supers take a byte and a float32 here: +5.6%
        from slmkit.gguf.quants import GGML_QUANT_SIZES
        block, size = GGML_QUANT_SIZES[tid]
        file_bytes = -(-shape[0] // 16) * 16 * shape[1] // block * size
        assert qw.nbytes <= file_bytes * (1.056 if type_name == "Q4_K" else 1.0), (qw.nbytes, type_name)
    ref = dequantize(raw, tid, shape, torch.float32)
    ours = dequantize_weight(qw, torch.float32)
    assert ours.shape == ref.shape
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), (type_name, shape)  # incl. -0.0
    return qw


def test_repackable_ids():
    assert REPACKABLE == frozenset(int(qtype(t)) for t in HANDLED)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("type_name", HANDLED)
def test_random_blocks_are_bit_exact(type_name, shape):
    qw = _check_exact(_raw(type_name, shape, seed=shape[0] * 7 + shape[1]), type_name, shape)
    codes = unpack_codes(qw.qweight, qw.bits)
    assert int(codes.max()) < (1 << {"Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6}.get(type_name, qw.bits))
    if shape[0] % 16:  # padding rows: code 0, scale 0, min 0 (as format.from_codes)
        assert not codes[shape[0]:].any()
        pad_s = qw.scales.transpose(1, 2).reshape(-1, qw.scales.shape[1])[shape[0]:]
        assert not pad_s.any()


@pytest.mark.parametrize("type_name", [t for t in HANDLED if has_reference_quantizer(t)])
def test_quantized_data_is_bit_exact(type_name):
    rng = np.random.default_rng(5)
    shape = (33, 256)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x[0, :32] = 0  # one all-zero block
    raw = torch.from_numpy(quantize(x, type_name).reshape(-1).copy())
    _check_exact(raw, type_name, shape)


@pytest.mark.parametrize("type_name", HANDLED)
def test_row_chunks_give_the_same_result(type_name):
    shape = (50, 512)
    raw = _raw(type_name, shape, seed=11)
    whole = _check_exact(raw, type_name, shape)
    chunked = _check_exact(raw, type_name, shape, chunk_bytes=1)  # one 16-row tile per chunk
    assert torch.equal(whole.qweight, chunked.qweight) and torch.equal(whole.scales, chunked.scales)
    assert whole.mins is None or (chunked.mins is not None and torch.equal(whole.mins, chunked.mins))


@pytest.mark.parametrize("type_name", HANDLED)
def test_reference_matmul_matches_float64(type_name):
    shape = (40, 512)
    raw = _raw(type_name, shape, seed=3)
    qw = repack(raw, int(qtype(type_name)), shape)
    assert qw is not None
    w = dequantize(raw, int(qtype(type_name)), shape, torch.float32).double()
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(0))
    q, d, _ = quantize_activations(x, qw.group, qw.kp)
    x_hat = (q.view(5, -1, qw.group) * d[..., None]).view(5, -1).double()   # exact in f32
    ref = x_hat @ w.T
    bound = x_hat.abs() @ w.abs().T                                          # scale of the sum
    err = (qmatmul_reference(x, qw).double() - ref).abs()
    assert bool((err <= 1e-6 * bound + 1e-30).all()), float((err / bound.clamp_min(1e-30)).max())


@pytest.mark.parametrize("tid", sorted(set(SUPPORTED_TYPES) - set(REPACKABLE)) + [9, 16, 999])
def test_unsupported_types_return_none(tid):
    block, size = (32, 4) if tid not in SUPPORTED_TYPES else block_sizes(SUPPORTED_TYPES[tid])
    shape = (4, 256)
    raw = torch.zeros(4 * 256 // block * size, dtype=torch.uint8)
    assert repack(raw, tid, shape) is None


def test_bad_input_raises():
    tid = int(qtype("Q4_0"))
    with pytest.raises(ValueError):
        repack(torch.zeros(10, dtype=torch.uint8), tid, (1, 32))   # needs 18 bytes
    with pytest.raises(ValueError):
        repack(torch.zeros(18, dtype=torch.uint8), tid, (1, 16))   # K not a multiple of 32
    with pytest.raises(ValueError):
        repack(torch.zeros(18, dtype=torch.int8), tid, (1, 32))
