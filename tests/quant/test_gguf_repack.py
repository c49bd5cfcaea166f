"""slmkit.quant.gguf_repack: GGUF blocks -> QuantWeight, bit-exact against slmkit.gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.gguf.quants import SUPPORTED_TYPES, dequantize
from slmkit.quant.format import (
    QuantWeight,
    activation_values,
    dequantize_weight,
    qmatmul_reference,
    unpack_codes,
)
from slmkit.quant.gguf_repack import REPACKABLE, repack
from tests.helpers.gguf_files import block_sizes, has_reference_quantizer, qtype, quantize, random_blocks

HANDLED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = [(16, 256), (40, 512), (33, 768), (1, 256)]
# (bits, group, zero, scale dtype, has mins) per type
LAYOUT = {
    "Q4_0": (4, 32, 8, torch.float16, False), "Q4_1": (4, 32, 0, torch.float16, True),
    "Q5_0": (5, 32, 16, torch.float16, False), "Q5_1": (5, 32, 0, torch.float16, True),
    "Q8_0": (8, 32, 128, torch.float16, False), "Q4_K": (4, 32, 0, torch.uint8, True),
    "Q5_K": (5, 32, 0, torch.uint8, True), "Q6_K": (6, 16, 32, torch.int8, False),
}
# K-quants keep their two levels: integer sub-scales x the file's float16 super-scale per 256 inputs
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
    assert qw.super_scales is None or qw.super_scales.dtype == torch.float16 and qw.scale_kind & 8
    # every type costs what the file costs (rows padded to 16), codes at their own bits, but for
    # Q4_K's and Q5_K's 6-bit sub-scales and sub-mins (a byte each here)
    from slmkit.gguf.quants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[tid]
    file_bytes = -(-shape[0] // 16) * 16 * shape[1] // block * size
    ours, theirs = {"Q4_K": (148, 144), "Q5_K": (180, 176)}.get(type_name, (1, 1))  # bytes a row per block
    assert qw.nbytes * theirs <= file_bytes * ours, (qw.nbytes, type_name)
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
    x_hat = activation_values(x, qw)                                         # exact
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


# ------------------------------------------------------------------ compiled repack (kernels/repack.cpp)
_PARTS = ("qweight", "scales", "mins", "super_scales", "super_mins")


def _kernel_or_skip():
    from slmkit.kernels.qgemm import get_kernel, kernel_has

    lib = get_kernel()
    if lib is None or not kernel_has(lib, "slm_repack"):
        pytest.skip("the compiled kernels do not run here (SLMKIT_KERNEL=0, no compiler, or not x86-64)")
    return lib


def _assert_same_bytes(a: QuantWeight, b: QuantWeight) -> None:
    assert (a.bits, a.n, a.k, a.group, a.zero) == (b.bits, b.n, b.k, b.group, b.zero)
    for part in _PARTS:
        x, y = getattr(a, part), getattr(b, part)
        assert (x is None) == (y is None), part
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, part
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), part  # NaN payloads, -0.0 included


@pytest.mark.parametrize("shape", [*SHAPES, (100, 1024)])
@pytest.mark.parametrize("type_name", HANDLED)
def test_compiled_repack_writes_the_python_repacks_bytes(type_name, shape):
    _kernel_or_skip()
    tid = int(qtype(type_name))
    raw = _raw(type_name, shape, seed=shape[0] + shape[1])
    _assert_same_bytes(repack(raw, tid, shape, kernel=True), repack(raw, tid, shape, kernel=False))
    # every bit pattern, the float16 scale fields too (NaN, inf, subnormal, -0.0)
    block, size = block_sizes(type_name)
    wild = torch.randint(0, 256, (shape[0] * shape[1] // block * size,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(shape[0]))
    _assert_same_bytes(repack(wild, tid, shape, kernel=True), repack(wild, tid, shape, kernel=False))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_compiled_repack_converts_every_float16_super_scale_as_torch(type_name):
    """The K-quants' float16 d (and -dmin, by its sign bit) in the compiled repack as in torch's: all
    65536 patterns, over a tensor big enough for several threads."""
    _kernel_or_skip()
    block, size = block_sizes(type_name)
    shape = (256, 256 * block)
    b = torch.randint(0, 256, (65536, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    every = torch.arange(65536, dtype=torch.int32)
    d_at = 208 if type_name == "Q6_K" else 0
    b[:, d_at:d_at + 2] = torch.stack((every & 0xFF, every >> 8), dim=1).to(torch.uint8)
    if type_name != "Q6_K":  # dmin: another order of all patterns
        perm = (every * 40503) & 0xFFFF
        b[:, 2:4] = torch.stack((perm & 0xFF, perm >> 8), dim=1).to(torch.uint8)
    tid = int(qtype(type_name))
    ours = repack(b.reshape(-1), tid, shape, kernel=True)
    _assert_same_bytes(ours, repack(b.reshape(-1), tid, shape, kernel=False))


def test_slmkit_kernel_0_repacks_in_pytorch(monkeypatch):
    from slmkit.quant import gguf_repack

    calls = []
    real = gguf_repack._repack_torch
    monkeypatch.setattr(gguf_repack, "_repack_torch", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("SLMKIT_KERNEL", "0")
    shape, tid = (40, 512), int(qtype("Q4_K"))
    raw = _raw("Q4_K", shape, seed=1)
    qw = repack(raw, tid, shape)
    assert calls == [1]
    with pytest.raises(RuntimeError, match="compiled repack"):
        repack(raw, tid, shape, kernel=True)
    assert qw is not None and torch.equal(dequantize_weight(qw), dequantize(raw, tid, shape))


def test_a_gguf_file_loads_the_same_through_either_repack(phi3_folders, tmp_path, monkeypatch):
    """The loader's quantized buffers (Q4_0 and Q8_0 linears, the quantized embedding) are the same
    bytes whichever repack made them."""
    _kernel_or_skip()
    import slmkit
    from slmkit.quant import gguf_repack
    from tests.helpers.gguf_models import hf_to_gguf

    monkeypatch.setenv("SLMKIT_GGUF_CACHE", "off")
    states = []
    for qt in ("Q4_0", "Q8_0"):
        path = hf_to_gguf(phi3_folders("gqa"), tmp_path / f"m-{qt}.gguf", qt)
        for kernel in (True, False):
            with monkeypatch.context() as m:
                m.setattr(gguf_repack, "_repack_library",
                          gguf_repack._repack_library if kernel else (lambda kernel: None))
                llm = slmkit.load(path)
            states.append({k: v.clone() for k, v in llm.engine.model.state_dict().items()})
        a, b = states[-2:]
        assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_float16_super_scales_round_trip_through_a_quantized_folder(type_name, tmp_path):
    """A GGUF K-quant weight kept as it is (a GGUF's quantized embedding in `slm quantize`'s folder)
    stores its float16 super-scales as they are and loads back the same weight, the same kernel kind;
    float32 super-mins beside float16 super-scales are a named error, not a misread."""
    import json

    from safetensors.torch import load_file, save_file

    from slmkit.errors import WeightError
    from slmkit.quant.store import META_KEY, split_quantized

    shape = (40, 512)
    qw = repack(_raw(type_name, shape, seed=3), int(qtype(type_name)), shape)
    assert qw is not None and qw.super_scales.dtype == torch.float16
    meta = {META_KEY: json.dumps({"m": {"bits": qw.bits, "group": qw.group, "zero": qw.zero, "n": qw.n, "k": qw.k}})}
    tensors = {k: v.contiguous() for k, v in qw.tensors("m").items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    got = split_quantized(load_file(str(tmp_path / "model.safetensors")), tmp_path)["m.weight"]
    assert got.scale_kind == qw.scale_kind and got.super_scales.dtype == torch.float16
    assert torch.equal(dequantize_weight(got), dequantize_weight(qw))
    if qw.super_mins is None:
        return
    tensors["m.super_mins"] = tensors["m.super_mins"].float()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    with pytest.raises(WeightError, match="m.super_mins"):
        split_quantized(load_file(str(tmp_path / "model.safetensors")), tmp_path)
