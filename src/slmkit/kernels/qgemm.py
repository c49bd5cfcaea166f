"""The compiled kernels (qgemm.cpp, fgemm.cpp): the quantized matmul, the attention (one or more new
queries per row over strided KV-cache views) and the batch-invariant float matmul; build, load,
call; None where unavailable.

Built once with the machine's C++ compiler (at `make` time, or on first use) into the package
folder when writable, else `$SLMKIT_HOME/kernels` / `~/.cache/slmkit/kernels`; the file name
carries a hash of the source, so an edited kernel is rebuilt. Loaded through ctypes after torch,
so it shares torch's OpenMP runtime. `SLMKIT_KERNEL=0` forces the pure-PyTorch path. Where the
CPU lacks AVX512-VNNI, or no compiler works, `get_kernel()` returns None and callers fall back.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..quant.format import QuantWeight

SOURCES = [Path(__file__).with_name("qgemm.cpp"), Path(__file__).with_name("fgemm.cpp")]
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512vnni", "-mf16c", "-mfma", "-ffp-contract=off"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
build_error: str | None = None  # why the kernel is unavailable, for `slm` diagnostics


def _lib_name() -> str:
    h = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:12]
    return f"libslmqgemm-{h}.so"


def _candidates() -> list[Path]:
    home = os.environ.get("SLMKIT_HOME")
    cache = Path(home) / "kernels" if home else Path.home() / ".cache" / "slmkit" / "kernels"
    return [SOURCES[0].parent / _lib_name(), cache / _lib_name()]


def build(verbose: bool = False) -> Path:
    """Compile the kernels (no-op when an up-to-date library exists); returns its path."""
    for p in _candidates():
        if p.is_file():
            return p
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    errors = []
    for dest in _candidates():
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
            os.close(fd)
        except OSError as e:
            errors.append(f"{dest.parent}: {e}")
            continue
        cmd = [cxx, *FLAGS, *map(str, SOURCES), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, dest)  # atomic: a concurrent loader never sees half a file
        if verbose:
            print(f"built {dest}", file=sys.stderr)
        return dest
    raise RuntimeError("no writable folder for the kernel: " + "; ".join(errors))


def get_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot run here."""
    global _lib, _tried, build_error
    if os.environ.get("SLMKIT_KERNEL", "1") in ("0", "off", "false"):
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise RuntimeError(f"the kernel is for x86-64 CPUs, not {platform.machine()}")
            lib = ctypes.CDLL(str(build()))
            if not lib.slm_supported():
                raise RuntimeError("this CPU has no AVX512-VNNI")
            lib.slm_qgemm.restype = ctypes.c_int
            lib.slm_qgemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.slm_attn.restype = ctypes.c_int
            lib.slm_attn.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64,
                                     ptr, i64, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
            lib.slm_fgemm_pairs.restype = ctypes.c_int
            lib.slm_fgemm_pairs.argtypes = [ctypes.c_int]
            lib.slm_fgemm_packed.restype = lib.slm_fgemm_rows.restype = ctypes.c_int
            lib.slm_fgemm_packed.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int, i64, i64, ptr, ptr, i64,
                                             ctypes.c_int]
            lib.slm_fgemm_rows.argtypes = [ptr, i64, i64, i64, ptr, i64, ctypes.c_int, i64, ptr, ptr, i64,
                                           ctypes.c_int]
            _lib = lib
        except (OSError, RuntimeError) as e:
            build_error = str(e)
            _lib = None
        _tried = True
    return _lib


def qmatmul_kernel(lib: ctypes.CDLL, x: torch.Tensor, qw: QuantWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16, CPU) @ W.T -> [M, N] in out_dtype (float32 or bfloat16)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, qw.n, dtype=out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32)
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rc = lib.slm_qgemm(x.data_ptr(), int(x.dtype == torch.bfloat16), m, qw.k, qw.k, qw.qweight.data_ptr(),
                       qw.scales.data_ptr(), ptr(qw.mins), qw.scale_kind, ptr(qw.super_scales), ptr(qw.super_mins),
                       qw.per_super, qw.bits, qw.tiles, qw.kp, qw.group, qw.zero, qw.n, out.data_ptr(),
                       int(out.dtype == torch.bfloat16), qw.n, threads_for(m * qw.n * qw.k))
    if rc:
        raise RuntimeError(f"slm_qgemm failed with code {rc}")
    return out if out.dtype == out_dtype else out.to(out_dtype)


# Float matmul (fgemm.cpp): each output a fixed sequence of float32 operations, whatever the row count.
FLOAT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pack_float_weight(lib: ctypes.CDLL, w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> slm_fgemm_packed's tiles (same dtype; zero rows pad N): [ceil(N / 16), K, 16], or
    for bfloat16 on CPUs with AVX512-BF16 [ceil(N / 16), ceil(K / 2), 16, 2] (k in pairs)."""
    n, k = w.shape
    tiles = (n + 15) // 16
    padded = w if n == tiles * 16 else torch.cat([w, w.new_zeros(tiles * 16 - n, k)])
    if lib.slm_fgemm_pairs(FLOAT_DTYPES[w.dtype]):
        if k % 2:
            padded = torch.cat([padded, padded.new_zeros(tiles * 16, 1)], dim=1)
        return padded.view(tiles, 16, -1, 2).transpose(1, 2).contiguous()
    return padded.view(tiles, 16, k).transpose(1, 2).contiguous()


def unpack_float_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_float_weight's result back to W [n, k] (a copy)."""
    tiles = packed.shape[0]
    if packed.dim() == 4:  # k in pairs
        return packed.permute(0, 2, 1, 3).reshape(tiles * 16, -1)[:n, :k].contiguous()
    return packed.transpose(1, 2).reshape(tiles * 16, -1)[:n, :k].contiguous()


SMALL_WORK = 1 << 18  # multiply-adds below which a second thread costs more than it saves


def threads_for(work: int) -> int:
    """Threads for a kernel call of `work` multiply-adds: one for small ones (a fork/join of OpenMP
    threads costs microseconds, and far more on a busy machine, where a tiny model's decode step
    took 3 ms per linear); torch's count otherwise. Results never depend on it (each output is
    computed by one thread in a fixed order)."""
    return 1 if work < SMALL_WORK else torch.get_num_threads()


def fmatmul_kernel(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                   n: int | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in W's dtype (x is cast to it). w is W [N, K] itself (last
    dim contiguous, read in place) or, with n = N given, pack_float_weight(W). A row's result does
    not depend on M (batch-invariant)."""
    dt = w.dtype
    x = x.to(dt).contiguous()
    m, k = x.shape
    packed = n is not None
    cols = n if n is not None else w.shape[0]
    out = torch.empty(m, cols, dtype=dt)
    if m == 0:
        return out
    b = None if bias is None else bias.to(dt).contiguous().data_ptr()
    threads = threads_for(m * k * cols)
    if packed:
        rc = lib.slm_fgemm_packed(x.data_ptr(), m, k, k, w.data_ptr(), FLOAT_DTYPES[dt], w.shape[0], cols, b,
                                  out.data_ptr(), cols, threads)
    else:
        rc = lib.slm_fgemm_rows(x.data_ptr(), m, k, k, w.data_ptr(), w.stride(0), FLOAT_DTYPES[dt], cols, b,
                                out.data_ptr(), cols, threads)
    if rc:
        raise RuntimeError(f"slm_fgemm failed with code {rc}")
    return out


# Attention (slm_attn): the dtypes it reads and writes, and a switch for benchmarks.
ATTN_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
decode_attention_enabled = os.environ.get("SLMKIT_DECODE_ATTN", "1") not in ("0", "off", "false")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, qpos: torch.Tensor | None,
                     window: int | None, scale: float) -> torch.Tensor | None:
    """S new queries per row: q [B, H, S, D], k / v [B, Hkv, L, D] (any strides, last dim contiguous,
    H a multiple of Hkv) -> [B, H, S, D], or None where the kernel cannot take it (the caller then
    uses SDPA). Query s of row b sits at position qpos[b, s] (None: L - S + s, every row) and sees
    keys j <= its position with, given a window W, j > position - W. float32 throughout, output in
    q's dtype. Each query's result is the same bits whatever the batch, S or L (see qgemm.cpp)."""
    lib = get_kernel() if decode_attention_enabled else None
    if lib is None or q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return None
    B, H, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    dt = ATTN_DTYPES.get(q.dtype)
    if (dt is None or k.dtype != q.dtype or v.dtype != q.dtype or k.shape[0] != B or k.shape[3] != D
            or H % Hkv or H // Hkv > 64 or L < 1 or not 1 <= S <= L or q.device.type != "cpu"
            or k.device.type != "cpu" or v.device.type != "cpu" or q.stride(3) != 1 or k.stride(3) != 1
            or v.stride(3) != 1
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if qpos is not None:
        if qpos.dtype != torch.long or qpos.device.type != "cpu" or qpos.shape != (B, S):
            return None
    out = torch.empty(B, S, H, D, dtype=q.dtype)
    rc = lib.slm_attn(dt, B, S, H, Hkv, D, q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                      k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                      v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), L,
                      None if qpos is None else qpos.data_ptr(), 0 if qpos is None else qpos.stride(0),
                      0 if qpos is None else qpos.stride(1), window or 0, scale, out.data_ptr(),
                      threads_for(B * S * H * L * D))
    if rc == -1:  # a query position outside 0..L-1 (the kernel checks them all): SDPA's masking instead
        return None
    if rc:
        raise RuntimeError(f"slm_attn failed with code {rc}")
    return out.transpose(1, 2)
