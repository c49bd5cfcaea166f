"""slmkit.gguf.quants.dequantize must match gguf.quants.dequantize (ggml's reference) bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.gguf import SUPPORTED_TYPES, dequantize, open_gguf
from tests.helpers.gguf_files import (
    block_sizes,
    has_reference_quantizer,
    qtype,
    quantize,
    random_blocks,
    reference_dequantize,
    write_gguf,
)

REQUIRED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]
ALL_TYPES = sorted(SUPPORTED_TYPES.values())
QUANTIZABLE = [t for t in ALL_TYPES if has_reference_quantizer(t)]
BLOCK_TYPES = [t for t in ALL_TYPES if t not in ("F32", "F16", "BF16")]


def _shapes(type_name: str) -> list[tuple[int, ...]]:
    block = block_sizes(type_name)[0]
    return [(block,), (3, block), (5, 4 * block), (2, 3, 2 * block)]


def _ours(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    out = dequantize(torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)), int(qtype(type_name)), shape)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == shape
    return out


def _reference(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    ref = reference_dequantize(raw, type_name).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(ref)).reshape(shape)


def test_supported_types_cover_the_required_ones():
    assert set(REQUIRED) <= set(ALL_TYPES)
    for tid, name in SUPPORTED_TYPES.items():
        assert int(qtype(name)) == tid


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_matches_reference_on_quantized_random_data(type_name):
    rng = np.random.default_rng(1234)
    for shape in _shapes(type_name):
        x = rng.standard_normal(shape).astype(np.float32) * 3
        x.reshape(-1)[: block_sizes(type_name)[0]] = 0  # one all-zero block (zero scale)
        raw = quantize(x, type_name)
        assert torch.equal(_ours(raw, type_name, shape), _reference(raw, type_name, shape)), shape


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_matches_reference_on_random_block_bytes(type_name):
    # Random bytes exercise every quant bit pattern (the K-quants have no reference quantizer).
    rng = np.random.default_rng(99)
    for shape in _shapes(type_name) + [(64, 4 * block_sizes(type_name)[0])]:
        raw = random_blocks(type_name, shape, rng)
        assert torch.equal(_ours(raw, type_name, shape), _reference(raw, type_name, shape)), shape


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_chunked_path_matches_reference(type_name, monkeypatch):
    # More blocks than one chunk, with a ragged last chunk.
    from slmkit.gguf import quants

    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 3 * block_sizes(type_name)[0])
    rng = np.random.default_rng(7)
    shape = (5, 2 * block_sizes(type_name)[0])
    raw = random_blocks(type_name, shape, rng)
    assert torch.equal(_ours(raw, type_name, shape), _reference(raw, type_name, shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_direct_low_precision_output_equals_rounding_the_float32_result(type_name, dtype, monkeypatch):
    """dequantize(..., dtype) writes through a small float32 buffer: same values as float32 then cast."""
    from slmkit.gguf import quants

    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 3 * block_sizes(type_name)[0])  # several ragged chunks
    monkeypatch.setattr(quants, "_MIN_CHUNK_ELEMENTS", 1)
    rng = np.random.default_rng(3)
    shape = (7, 2 * block_sizes(type_name)[0])
    if type_name in ("F32", "F16", "BF16"):
        data = rng.standard_normal(shape).astype(np.float32)
        raw = torch.from_numpy(quantize(data, type_name).view(np.uint8).reshape(-1).copy())
    else:
        raw = torch.from_numpy(random_blocks(type_name, shape, rng).reshape(-1).copy())
    qt = {v: k for k, v in SUPPORTED_TYPES.items()}[type_name]
    low = dequantize(raw, qt, shape, dtype)
    assert low.dtype == dtype and low.shape == shape
    assert torch.equal(low, dequantize(raw, qt, shape).to(dtype))


def test_float_types_special_values():
    x = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 1e-7, np.inf, -np.inf] * 4, dtype=np.float32)
    for type_name in ("F32", "F16", "BF16"):
        raw = quantize(x, type_name)
        ours, ref = _ours(raw, type_name, x.shape), _reference(raw, type_name, x.shape)
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), type_name


def test_f32_is_a_view_of_the_bytes():
    raw = torch.from_numpy(np.arange(8, dtype=np.float32).view(np.uint8).copy())
    out = dequantize(raw, 0, (2, 4))
    assert out.data_ptr() == raw.data_ptr()
    assert out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_misaligned_float_bytes_are_copied():
    buf = torch.zeros(1 + 16, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(np.arange(4, dtype=np.float32).view(np.uint8).copy())
    assert dequantize(buf[1:], 0, (4,)).tolist() == [0, 1, 2, 3]


def test_rejects_wrong_sizes_and_types():
    with pytest.raises(ValueError, match="needs 18 bytes"):
        dequantize(torch.zeros(17, dtype=torch.uint8), int(qtype("Q4_0")), (32,))
    with pytest.raises(ValueError, match="block size"):
        dequantize(torch.zeros(18, dtype=torch.uint8), int(qtype("Q4_0")), (16, 2))
    with pytest.raises(ValueError, match="16"):
        dequantize(torch.zeros(66, dtype=torch.uint8), 16, (256,))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.float32), 0, (8,))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_round_trip_through_gguf_file(tmp_path, type_name):
    rng = np.random.default_rng(5)
    shapes = {"w2d": (48, 256), "w3d": (2, 3, 256), "w1d": (256,)}
    tensors, expected = {}, {}
    for name, shape in shapes.items():
        if type_name in QUANTIZABLE:
            x = rng.standard_normal(shape).astype(np.float32)
            tensors[name] = (x, type_name)
            raw = quantize(x, type_name)
        else:
            raw = random_blocks(type_name, shape, rng)
            tensors[name] = (raw, type_name)
        expected[name] = (raw, _reference(raw, type_name, shape))
    path = write_gguf(tmp_path / f"{type_name}.gguf", "llama", {}, tensors)

    with open_gguf(path) as f:
        for name, shape in shapes.items():
            info = f.tensors[name]
            assert info.shape == shape
            assert info.type_name == type_name and info.ggml_type == int(qtype(type_name))
            raw, ref = expected[name]
            assert info.nbytes == raw.nbytes
            assert torch.equal(f.raw(name), torch.from_numpy(raw.reshape(-1)))
            out = f.tensor(name)
            assert out.dtype == torch.float32 and tuple(out.shape) == shape
            assert torch.equal(out, ref)
            assert torch.equal(f.tensor(name, torch.float16), ref.to(torch.float16))
            assert torch.equal(f.tensor(name, torch.bfloat16), ref.to(torch.bfloat16))


def test_dequantize_is_vectorised():
    # 3072 x 8192 Q4_K (98,304 blocks) takes ~0.2 s on 2 cores; a per-block Python loop takes
    # tens of seconds. The bound is loose so a loaded machine does not make this flaky.
    import time

    shape = (3072, 8192)
    raw = torch.from_numpy(random_blocks("Q4_K", shape, np.random.default_rng(3)).reshape(-1))
    t0 = time.perf_counter()
    out = dequantize(raw, int(qtype("Q4_K")), shape)
    assert time.perf_counter() - t0 < 5.0
    assert tuple(out.shape) == shape
