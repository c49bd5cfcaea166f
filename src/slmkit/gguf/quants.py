"""Vectorised torch dequantisation of ggml tensor types.

Every function here reproduces ``gguf.quants.dequantize`` (ggml's own Python reference) bit for
bit: f16 scales are widened to f32 first, the per-sub-block scale products are formed in f32, and
the final ``scale * q (+/- min)`` is computed as separate f32 operations in the same order (never
fused). The work is done on ``[n_blocks, type_size]`` uint8 views with torch ops only; the only
Python loop is over chunks of a few thousand blocks, which bounds the size of the temporaries.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "SUPPORTED_TYPES",
    "GGML_TYPE_NAMES",
    "GGML_QUANT_SIZES",
    "dequantize",
    "tensor_nbytes",
    "nibbles",
    "bits",
    "k_scale_min",
    "q4_0_codes", "q4_1_codes", "q5_0_codes", "q5_1_codes", "q4_k_codes", "q5_k_codes", "q6_k_codes",
]

QK_K = 256

# Every type id ggml defines (for error messages); only SUPPORTED_TYPES can be dequantised.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

_U8 = torch.uint8
_F32 = torch.float32

_SH_0_4 = torch.tensor([0, 4], dtype=_U8)
_SH_2BIT = torch.tensor([0, 2, 4, 6], dtype=_U8)
_SH_BITS = torch.arange(8, dtype=_U8)
_SH_IQ4XS_H = torch.arange(0, 16, 2, dtype=torch.int32)

_KVALUES_IQ4NL = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=_F32
)
_KVALUES_MXFP4 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=_F32)


# ----------------------------------------------------------------------------- helpers
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """[n, 1] f32 from the little-endian f16 at byte ``at`` of every block."""
    return b[:, at:at + 2].contiguous().view(torch.float16).to(_F32)


def _f32(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at:at + 4].contiguous().view(_F32)


def nibbles(x: torch.Tensor, run: int | None = None) -> torch.Tensor:
    """[n, L] bytes -> [n, 2L]: per run of `run` bytes (default all L), all low nibbles, then all
    high nibbles (ggml's order). Works on int32 views, 4 bytes per element op (L, run % 4 == 0)."""
    n, length = x.shape
    run = run or length
    xc = torch.empty(n, length, dtype=_U8).copy_(x)  # fresh, aligned, standard strides to reinterpret
    xi = xc.view(torch.int32).view(n * (length // run), run // 4)
    return torch.cat((xi & 0x0F0F0F0F, (xi >> 4) & 0x0F0F0F0F), dim=1).view(_U8).view(n, 2 * length)


def bits(x: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] of 0/1, element i = bit i % 8 of byte i // 8 (little endian)."""
    n, k = x.shape
    return ((x.unsqueeze(-1) >> _SH_BITS.view(1, 1, 8)) & 1).reshape(n, 8 * k)


def k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scale/min block of Q4_K / Q5_K into two [n, 8] f32 tensors."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.to(_F32), mn.to(_F32)


# ------------------------------------------------------------------- block codes
# The unsigned codes of one block type, [n, block_size] uint8, in ggml's element order: the one
# decoding of each layout, shared by the dequantisers below and quant/gguf_repack.py.
def q4_0_codes(b: torch.Tensor) -> torch.Tensor:
    return nibbles(b[:, 2:18])


def q4_1_codes(b: torch.Tensor) -> torch.Tensor:
    return nibbles(b[:, 4:20])


def q5_0_codes(b: torch.Tensor) -> torch.Tensor:
    return nibbles(b[:, 6:22]) | (bits(b[:, 2:6]) << 4)


def q5_1_codes(b: torch.Tensor) -> torch.Tensor:
    return nibbles(b[:, 8:24]) | (bits(b[:, 4:8]) << 4)


def q4_k_codes(b: torch.Tensor) -> torch.Tensor:
    return nibbles(b[:, 16:144], 32)


def q5_k_codes(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = nibbles(b[:, 48:176], 32)
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> _SH_BITS.view(1, 1, 8, 1)) & 1
    return ql | (qh.reshape(n, QK_K) << 4)


def q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = nibbles(b[:, 0:128], 64)
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _SH_2BIT.view(1, 1, 4, 1)) & 3
    return ql.reshape(n, QK_K) | (qh.reshape(n, QK_K) << 4)


# ------------------------------------------------------------------- block dequantisers
# Each takes blocks [n, type_size] uint8 and writes out [n, block_size] float32.
def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    q = (q4_0_codes(b).view(torch.int8) - 8).to(_F32)
    torch.mul(d, q, out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    q = q4_1_codes(b).to(_F32)
    torch.mul(d, q, out=out)
    out.add_(m)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    q = (q5_0_codes(b).view(torch.int8) - 16).to(_F32)
    torch.mul(d, q, out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b, 0), _f16(b, 2)
    q = q5_1_codes(b).to(_F32)
    torch.mul(d, q, out=out)
    out.add_(m)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    torch.mul(b[:, 2:34].view(torch.int8).to(_F32), d, out=out)


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(_F32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(_F32)).view(n, 16, 1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _SH_2BIT.view(1, 1, 4, 1)) & 3
    o = out.view(n, 16, 16)
    torch.mul(dl, q.reshape(n, 16, 16).to(_F32), out=o)
    o.sub_(ml)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    hmask, qs, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    lo = ((sc[:, 0:8].reshape(n, 1, 8) >> _SH_0_4.view(1, 2, 1)) & 0x0F).reshape(n, 16)
    hi = ((sc[:, 8:12].reshape(n, 1, 4) >> _SH_2BIT.view(1, 4, 1)) & 0x03).reshape(n, 16)
    scales = (lo | (hi << 4)).to(_F32).sub_(32)
    dl = (d * scales).view(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _SH_2BIT.view(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    # The high bit is stored inverted: a set bit means "no -4 offset".
    qh = ((hmask.reshape(n, 1, 1, 32) >> _SH_BITS.view(1, 1, 8, 1)) & 1).reshape(n, 16, 16)
    q = (ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)).to(_F32)
    torch.mul(dl, q, out=out.view(n, 16, 16))


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scale_min(b[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    q = q4_k_codes(b)
    o = out.view(n, 8, 32)
    torch.mul(dl, q.view(n, 8, 32).to(_F32), out=o)
    o.sub_(ml)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scale_min(b[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    o = out.view(n, 8, 32)
    torch.mul(dl, q5_k_codes(b).view(n, 8, 32).to(_F32), out=o)
    o.sub_(ml)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16(b, 208)
    dl = (d * b[:, 192:208].view(torch.int8).to(_F32)).view(n, 16, 1)
    q = (q6_k_codes(b).view(torch.int8) - 32).to(_F32).view(n, 16, 16)
    torch.mul(dl, q, out=out.view(n, 16, 16))


def _q8_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f32(b, 0)
    torch.mul(d, b[:, 4:260].view(torch.int8).to(_F32), out=out)


def _iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b, 0)
    q = _KVALUES_IQ4NL[nibbles(b[:, 2:18]).long()]
    torch.mul(d, q, out=out)


def _iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16(b, 0)
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    hi = ((sh.view(n, 1) >> _SH_IQ4XS_H.view(1, 8)) & 3).to(_U8)
    lo = ((b[:, 4:8].reshape(n, 4, 1) >> _SH_0_4.view(1, 1, 2)) & 0x0F).reshape(n, 8)
    scales = (lo | (hi << 4)).to(_F32).sub_(32)
    dl = (d * scales).view(n, 8, 1)
    idx = nibbles(b[:, 8:136], 16).view(n, 8, 32)
    torch.mul(dl, _KVALUES_IQ4NL[idx.long()], out=out.view(n, 8, 32))


def _mxfp4(b: torch.Tensor, out: torch.Tensor) -> None:
    e = b[:, 0:1].to(torch.int32)
    # ggml_e8m0_to_fp32_half: 2**(e - 128) as an f32 bit pattern (denormal for e < 2).
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    d = bits.view(_F32)
    torch.mul(d, _KVALUES_MXFP4[nibbles(b[:, 1:17]).long()], out=out)


# id -> (name, block_size, type_size, block function or None for plain float types)
_TYPES: dict[int, tuple[str, int, int, Callable[[torch.Tensor, torch.Tensor], None] | None]] = {
    0: ("F32", 1, 4, None),
    1: ("F16", 1, 2, None),
    30: ("BF16", 1, 2, None),
    2: ("Q4_0", 32, 18, _q4_0),
    3: ("Q4_1", 32, 20, _q4_1),
    6: ("Q5_0", 32, 22, _q5_0),
    7: ("Q5_1", 32, 24, _q5_1),
    8: ("Q8_0", 32, 34, _q8_0),
    10: ("Q2_K", QK_K, 84, _q2_k),
    11: ("Q3_K", QK_K, 110, _q3_k),
    12: ("Q4_K", QK_K, 144, _q4_k),
    13: ("Q5_K", QK_K, 176, _q5_k),
    14: ("Q6_K", QK_K, 210, _q6_k),
    15: ("Q8_K", QK_K, 292, _q8_k),
    20: ("IQ4_NL", 32, 18, _iq4_nl),
    23: ("IQ4_XS", QK_K, 136, _iq4_xs),
    39: ("MXFP4", 32, 17, _mxfp4),
}

SUPPORTED_TYPES: dict[int, str] = {tid: t[0] for tid, t in _TYPES.items()}
GGML_QUANT_SIZES: dict[int, tuple[int, int]] = {tid: (t[1], t[2]) for tid, t in _TYPES.items()}

# Work is split into chunks of blocks to bound the temporaries. A chunk dequantises to at most
# _CHUNK_ELEMENTS elements, and a tensor is split into about _CHUNKS_PER_TENSOR chunks but none
# smaller than _MIN_CHUNK_ELEMENTS: each torch op is an OpenMP parallel region, and on a machine
# whose cores are busy every region costs a scheduler time slice, so fewer, larger ops win there
# (a 3072x8192 Q4_K took ~1 s with 1M-element chunks on 2 busy cores, ~0.2 s with 6M).
_CHUNK_ELEMENTS = 1 << 24
_MIN_CHUNK_ELEMENTS = 1 << 20
_CHUNKS_PER_TENSOR = 4


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` (torch order) occupies; ValueError if the type is unsupported
    or the last dimension is not a multiple of the block size."""
    if int(ggml_type) not in _TYPES:
        raise ValueError(f"unsupported ggml type id {ggml_type}")
    block, size = GGML_QUANT_SIZES[int(ggml_type)]
    if shape and shape[-1] % block:
        raise ValueError(
            f"last dimension {shape[-1]} is not a multiple of the {SUPPORTED_TYPES[int(ggml_type)]}"
            f" block size {block}"
        )
    return math.prod(shape) // block * size


def _as_dtype(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret contiguous uint8 bytes as ``dtype`` (copying when the offset is misaligned)."""
    try:
        return flat.view(dtype)
    except RuntimeError:
        return flat.clone().view(dtype)


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise the bytes of one ggml tensor to ``dtype`` (values computed in float32, as ggml
    does, then rounded once) with torch shape ``shape``.

    ``raw`` is a uint8 tensor holding exactly the tensor's bytes. For F32 the result may be a
    view of ``raw``; every other type returns a new tensor. A non-float32 ``dtype`` is written
    chunk by chunk through one small float32 buffer: no full-size float32 copy is ever made.
    """
    tid = int(ggml_type)
    if tid not in _TYPES:
        name = GGML_TYPE_NAMES.get(tid)
        raise ValueError(f"unsupported ggml type id {tid}" + (f" ({name})" if name else ""))
    if raw.dtype != _U8:
        raise ValueError(f"raw tensor bytes must be uint8, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    _, block, size, fn = _TYPES[tid]
    expected = tensor_nbytes(tid, shape)
    flat = raw.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() != expected:
        raise ValueError(
            f"{SUPPORTED_TYPES[tid]} tensor of shape {shape} needs {expected} bytes, got {flat.numel()}"
        )

    if tid == 0:
        return _as_dtype(flat, _F32).to(dtype).view(shape)
    if tid == 1:  # f16 -> f32 is exact, so one direct cast rounds the same way
        return _as_dtype(flat, torch.float16).to(dtype).view(shape)
    if tid == 30:
        # bf16 -> f32 is exact (the bit pattern shifted left by 16), as in the reference.
        return _as_dtype(flat, torch.bfloat16).to(dtype).view(shape)

    assert fn is not None
    n_blocks = expected // size
    blocks = flat.view(n_blocks, size)
    out = torch.empty((n_blocks, block), dtype=dtype)
    per_chunk = min(_CHUNK_ELEMENTS, max(_MIN_CHUNK_ELEMENTS, -(-n_blocks * block // _CHUNKS_PER_TENSOR)))
    step = max(1, per_chunk // block)
    tmp = None if dtype == _F32 else torch.empty((min(step, n_blocks), block), dtype=_F32)
    for start in range(0, n_blocks, step):
        stop = min(n_blocks, start + step)
        if tmp is None:
            fn(blocks[start:stop], out[start:stop])
        else:
            fn(blocks[start:stop], tmp[: stop - start])
            out[start:stop].copy_(tmp[: stop - start])
    return out.view(shape)
