"""Lossless conversion of GGUF quantized blocks into slmkit's `QuantWeight` layout.

Each handled ggml type maps onto ``w = scale * (u - zero) + min`` with the codes taken verbatim
and the scale / min products formed exactly as ggml forms them (f16 widened to f32, product in
f32), so ``dequantize_weight(repack(...))`` equals ``slmkit.gguf.quants.dequantize`` bit for bit.
The K-quants' ``d*sc*q - dmin*m`` becomes ``scale*u + min`` with ``min = -(dmin*m)``: IEEE
subtraction *is* addition of the negation, so this is exact too. Types without such a mapping
(float types, Q2_K, Q3_K, IQ*, ...) give None: the caller re-quantizes those from float.

Two implementations write the same bytes: kernels/repack.cpp (in the compiled kernel library,
multi-threaded over row tiles, reading the memory-mapped file's blocks in place and writing the
result's tensors directly) where that library is loaded, and the PyTorch one below (the decoders
of slmkit.gguf.quants; used with SLMKIT_KERNEL=0 or without a compiler), tested byte for byte
against each other (tests/quant/test_gguf_repack.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from slmkit.gguf.quants import (
    GGML_QUANT_SIZES,
    k_scale_min,
    q4_0_codes,
    q4_1_codes,
    q4_k_codes,
    q5_0_codes,
    q5_1_codes,
    q5_k_codes,
    q6_k_codes,
)
from slmkit.quant.format import TILE, QuantWeight, _tile_groups, code_vectors, pack_codes, padded, two_level_parts

__all__ = ["REPACKABLE", "repack"]

_U8, _F16 = torch.uint8, torch.float16

# Decoded blocks: codes [nb, block] uint8, scales [nb, block // group], mins (same) or None, and
# for two-level (K-quant) types the float16 super-scale and super-min [nb, 1] (else None).
_Decoded = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def _h(b: torch.Tensor, at: int) -> torch.Tensor:
    """[nb, 1] float16 stored at byte ``at`` of every block (kept as f16: exact)."""
    return b[:, at:at + 2].contiguous().view(_F16)


def _q4_0(b: torch.Tensor) -> _Decoded:
    return q4_0_codes(b), _h(b, 0), None, None, None


def _q4_1(b: torch.Tensor) -> _Decoded:
    return q4_1_codes(b), _h(b, 0), _h(b, 2), None, None


def _q5_0(b: torch.Tensor) -> _Decoded:
    return q5_0_codes(b), _h(b, 0), None, None, None


def _q5_1(b: torch.Tensor) -> _Decoded:
    return q5_1_codes(b), _h(b, 0), _h(b, 2), None, None


def _q8_0(b: torch.Tensor) -> _Decoded:
    q = torch.empty(b.shape[0], 32, dtype=_U8).copy_(b[:, 2:34])  # int8 q -> uint8 q + 128, 4 bytes an op
    return (q.view(torch.int32) ^ -0x7F7F7F80).view(_U8), _h(b, 0), None, None, None


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K two levels: 6-bit sub-scales and sub-mins [nb, 8] (uint8), super-scale d and
    super-min -dmin [nb, 1] (float16 as the file has them; -dmin by its sign bit, so a NaN keeps its
    bits, as repack.cpp forms it). d * sc and (-dmin) * m in float32 are ggml's products (negation
    is exact), so the kernel forms exactly ggml's scale and min."""
    sc, mn = k_scale_min(b[:, 4:16])
    neg_dmin = (_h(b, 2).view(torch.int16) ^ -0x8000).view(_F16)
    return sc.to(_U8), mn.to(_U8), _h(b, 0), neg_dmin


def _q4_k(b: torch.Tensor) -> _Decoded:
    sc, mn, d, dmin = _k_scales(b)
    return q4_k_codes(b), sc, mn, d, dmin


def _q5_k(b: torch.Tensor) -> _Decoded:
    sc, mn, d, dmin = _k_scales(b)
    return q5_k_codes(b), sc, mn, d, dmin


def _q6_k(b: torch.Tensor) -> _Decoded:
    return q6_k_codes(b), b[:, 192:208].view(torch.int8), None, _h(b, 208), None


class _Spec(NamedTuple):
    bits: int
    group: int
    zero: int
    dtype: torch.dtype               # of scales (mins: the same, or uint8 with integer scales)
    has_min: bool
    per_super: int                   # groups per float16 super-scale (two-level types), else 0
    decode: Callable[[torch.Tensor], _Decoded]


_SPECS: dict[int, _Spec] = {
    2: _Spec(4, 32, 8, _F16, False, 0, _q4_0),
    3: _Spec(4, 32, 0, _F16, True, 0, _q4_1),
    6: _Spec(5, 32, 16, _F16, False, 0, _q5_0),
    7: _Spec(5, 32, 0, _F16, True, 0, _q5_1),
    8: _Spec(8, 32, 128, _F16, False, 0, _q8_0),
    12: _Spec(4, 32, 0, _U8, True, 8, _q4_k),
    13: _Spec(5, 32, 0, _U8, True, 8, _q5_k),
    14: _Spec(6, 16, 32, torch.int8, False, 16, _q6_k),
}

REPACKABLE: frozenset[int] = frozenset(_SPECS)

# Rough bytes of temporaries per weight element while decoding and packing one row chunk.
_TEMP_BYTES_PER_ELEMENT = 8
# Below this many bytes a tensor is repacked by one thread (an OpenMP fork costs more than it saves).
_SMALL_TENSOR = 1 << 20


def repack(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int], *,
           chunk_bytes: int = 16 << 20, kernel: bool | None = None) -> QuantWeight | None:
    """The GGUF bytes of a 2-D weight of torch shape ``(n, k)`` as a QuantWeight, losslessly;
    None for a type in no lossless mapping. kernel: None repacks in the compiled library
    (kernels/repack.cpp: multi-threaded, straight from ``raw`` into the result) where it is
    loaded, else in PyTorch; False forces PyTorch, True the library (RuntimeError without it).
    Both write the same bytes. PyTorch decodes rows in chunks of about ``chunk_bytes`` of
    temporaries, written into the result's preallocated tiled tensors."""
    spec = _SPECS.get(int(ggml_type))
    if spec is None:
        return None
    if raw.dtype != _U8:
        raise ValueError(f"raw tensor bytes must be uint8, got {raw.dtype}")
    if len(shape) != 2:
        raise ValueError(f"repack needs a 2-D weight, got shape {tuple(shape)}")
    n, k = (int(s) for s in shape)
    block, size = GGML_QUANT_SIZES[int(ggml_type)]
    if n <= 0 or k <= 0 or k % block:
        raise ValueError(f"shape {(n, k)}: K must be a positive multiple of the block size {block}")
    row_bytes = k // block * size
    flat = raw.reshape(-1)
    if flat.numel() != n * row_bytes:
        raise ValueError(f"shape {(n, k)} needs {n * row_bytes} bytes, got {flat.numel()}")

    bits, group = spec.bits, spec.group
    tiles, groups = padded(n, TILE) // TILE, k // group
    qweight = torch.empty(tiles, code_vectors(bits, k), 64, dtype=_U8)
    s_sup = m_sup = None
    if spec.per_super:  # two-level: paired scales and mins (repack.cpp writes them so)
        scales, mins, s_sup, m_sup = two_level_parts(tiles, groups, groups // spec.per_super, spec.dtype,
                                                     spec.has_min, _F16)
    else:
        scales = torch.empty(tiles, groups, TILE, dtype=spec.dtype)
        mins = torch.empty(tiles, groups, TILE, dtype=spec.dtype) if spec.has_min else None
    qw = QuantWeight(bits, n, k, group, spec.zero, qweight, scales, mins, s_sup, m_sup)

    lib = _repack_library(kernel)
    if lib is not None:
        _repack_kernel(lib, flat.contiguous(), int(ggml_type), qw)
    else:
        _repack_torch(spec, flat.view(n, row_bytes), size, qw, chunk_bytes)
    return qw


def _repack_library(kernel: bool | None) -> Any:
    """The kernel library to repack with, or None for the PyTorch path (see repack's kernel)."""
    if kernel is False:
        return None
    from slmkit.kernels.qgemm import get_kernel, kernel_has

    lib = get_kernel()
    if lib is not None and kernel_has(lib, "slm_repack"):
        return lib
    if kernel:
        raise RuntimeError("the compiled repack is not available here (SLMKIT_KERNEL=0, or no kernel library)")
    return None


def _repack_kernel(lib: Any, flat: torch.Tensor, ggml_type: int, qw: QuantWeight) -> None:
    """repack.cpp over the tiles (one thread for a small tensor, torch's count otherwise)."""
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    threads = 1 if flat.numel() < _SMALL_TENSOR else torch.get_num_threads()
    rc = lib.slm_repack(flat.data_ptr(), ggml_type, qw.n, qw.k, qw.qweight.data_ptr(), qw.scales.data_ptr(),
                        ptr(qw.mins), ptr(qw.super_scales), ptr(qw.super_mins), threads)
    if rc:
        raise RuntimeError(f"slm_repack failed with code {rc} (ggml type {ggml_type}, shape {(qw.n, qw.k)})")


def _repack_torch(spec: _Spec, rows_raw: torch.Tensor, size: int, qw: QuantWeight, chunk_bytes: int) -> None:
    """The PyTorch repack (the fallback, and the reference the compiled one is tested against)."""
    n, k, bits = qw.n, qw.k, qw.bits

    def put(dst: torch.Tensor | None, x: torch.Tensor | None, rows: int, rp: int, t0: int, t1: int) -> None:
        if dst is None or x is None:
            return
        x = x.reshape(rows, -1)
        if rp != rows:  # padding rows: code 0, scale 0, min 0 (as format.from_codes pads)
            x = torch.nn.functional.pad(x, (0, 0, 0, rp - rows))
        dst[t0:t1] = _tile_groups(x)

    step = max(TILE, chunk_bytes // (_TEMP_BYTES_PER_ELEMENT * k) // TILE * TILE)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows, rp = r1 - r0, padded(r1 - r0, TILE)
        u, s, m, ss, sm = spec.decode(rows_raw[r0:r1].contiguous().view(-1, size))
        u = u.reshape(rows, k)
        if rp != rows:
            u = torch.nn.functional.pad(u, (0, 0, 0, rp - rows))
        t0, t1 = r0 // TILE, r0 // TILE + rp // TILE
        qw.qweight[t0:t1] = pack_codes(u, bits)
        put(qw.scales, s, rows, rp, t0, t1)
        put(qw.mins, m, rows, rp, t0, t1)
        put(qw.super_scales, ss, rows, rp, t0, t1)
        put(qw.super_mins, sm, rows, rp, t0, t1)
