"""The compiled kernels (qgemm.cpp, attn.cpp, fgemm.cpp, repack.cpp, fused.cpp): the quantized matmul, the
attention (one or more new queries per row over strided KV-cache views), the batch-invariant float matmul, the GGUF
repack and Gemma 3's fused decode step (kernels/fused.py); build, load, call; None where unavailable.

Built once with the machine's C++ compiler (at `make` time, or on first use) into the package
folder when writable, else `$SLMKIT_HOME/kernels` / `~/.cache/slmkit/kernels`; the file name
carries a hash of the source, so an edited kernel is rebuilt. Loaded through ctypes after torch,
so it shares torch's OpenMP runtime. Two variants, chosen from the CPU's flags (/proc/cpuinfo): AVX512
(-VNNI, -BF16 where present) and AVX2 + FMA + F16C (+ AVX-VNNI) with the same arithmetic (the same
bits, but for bfloat16 float matmuls, which AVX512-BF16 pairs up). `SLMKIT_KERNEL=avx2` forces the
AVX2 one, `SLMKIT_KERNEL=0` the pure-PyTorch path. Where neither runs, or no compiler works,
`get_kernel()` returns None and callers fall back.
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
from typing import Any

import torch

from ..envflags import is_off
from ..quant.format import QuantWeight

HERE = Path(__file__).parent
SOURCES = [HERE / "qgemm.cpp", HERE / "attn.cpp", HERE / "fgemm.cpp", HERE / "repack.cpp", HERE / "fused.cpp"]
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512vnni", "-mf16c", "-mfma", "-ffp-contract=off"]
# The AVX2 build (CPUs without AVX512): its own translation units and flags, never -mavx512*. The
# int8 dot products are built twice, plain and with AVX-VNNI's 256-bit vpdpbusd (used where the CPU
# has avx_vnni; left out where the compiler lacks -mavxvnni). -fno-trapping-math lets GCC turn the
# activations' clamps into blends where AVX2 has no mask registers, so SiLU and GeGLU vectorize there
# as in the AVX512 build (the same values: it drops no rounding, only the FP-exception flags' order).
AVX2_FLAGS = ["-O3", "-fPIC", "-fopenmp", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off",
              "-fno-trapping-math"]
AVX2_UNITS = [(HERE / "qgemm_avx2.cpp", []), (HERE / "qgemm_avx2.cpp", ["-mavxvnni", "-DSLM_VNNI"]),
              (HERE / "attn_avx2.cpp", []), (HERE / "fgemm_avx2.cpp", []), (HERE / "repack.cpp", []),
              (HERE / "fused.cpp", [])]  # portable C++: the same source in both libraries
# included by both builds: part of both libraries' names
HEADERS = [HERE / "bf16.h", HERE / "layout.h", HERE / "attn_driver.h"]
AVX2_HEADERS = [HERE / "avx2.h", HERE / "qgemm_avx2_codes.h", HERE / "qgemm_avx2_scales.h", *HEADERS]
VARIANTS = ("avx512", "avx2")  # preferred first; SLMKIT_KERNEL=avx2 / =avx512 forces one, =0 none

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_libs: dict[str, ctypes.CDLL | None] = {}
build_error: str | None = None  # why the kernel is unavailable, for `slm` diagnostics
variant: str | None = None  # the variant get_kernel() loaded ("avx512" / "avx2"), None before / without


def _lib_name(which: str = "avx512") -> str:
    if which == "avx512":
        blob = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS]) + " ".join(FLAGS).encode()
        return f"libslmqgemm-{hashlib.sha256(blob).hexdigest()[:12]}.so"
    files = sorted({p for p, _ in AVX2_UNITS} | set(AVX2_HEADERS))
    blob = b"".join(p.read_bytes() for p in files) + repr((AVX2_FLAGS, AVX2_UNITS)).encode()
    return f"libslmavx2-{hashlib.sha256(blob).hexdigest()[:12]}.so"


def _candidates(which: str = "avx512") -> list[Path]:
    home = os.environ.get("SLMKIT_HOME")
    cache = Path(home) / "kernels" if home else Path.home() / ".cache" / "slmkit" / "kernels"
    return [HERE / _lib_name(which), cache / _lib_name(which)]


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def cpu_variants(flags: set[str] | None = None) -> list[str]:
    """The kernel variants this CPU can run, preferred first. Without /proc/cpuinfo: both, and each
    library's own cpuid check (slm_supported) decides."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return list(VARIANTS)
    out = []
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"} <= flags:
        out.append("avx512")
    if {"avx2", "fma", "f16c"} <= flags:
        out.append("avx2")
    return out


def _compile(cxx: str, tmp: str, which: str) -> None:
    if which == "avx512":
        cmd = [cxx, *FLAGS, *map(str, SOURCES), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        return
    with tempfile.TemporaryDirectory() as d:
        objs = []
        for i, (src, extra) in enumerate(AVX2_UNITS):
            obj = str(Path(d) / f"{i}.o")
            cmd = [cxx, *AVX2_FLAGS, *extra, "-c", str(src), "-o", obj]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                if "-DSLM_VNNI" in extra:  # an older compiler without -mavxvnni: the plain path only
                    continue
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
            objs.append(obj)
        cmd = [cxx, "-shared", "-fopenmp", *objs, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def build(verbose: bool = False, which: str | None = None) -> Path:
    """Compile a kernel variant (default: the CPU's preferred one, else avx512) unless an up-to-date
    library exists; returns its path."""
    which = which or (cpu_variants() or ["avx512"])[0]
    for p in _candidates(which):
        if p.is_file():
            return p
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    errors = []
    for dest in _candidates(which):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
            os.close(fd)
        except OSError as e:
            errors.append(f"{dest.parent}: {e}")
            continue
        try:
            _compile(cxx, tmp, which)
        except RuntimeError:
            os.unlink(tmp)
            raise
        os.replace(tmp, dest)  # atomic: a concurrent loader never sees half a file
        if verbose:
            print(f"built {dest}", file=sys.stderr)
        return dest
    raise RuntimeError("no writable folder for the kernel: " + "; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
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
    lib.slm_repack.restype = ctypes.c_int  # repack.cpp: GGUF blocks -> QuantWeight (quant/gguf_repack.py)
    lib.slm_repack.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    from .fused import declare  # fused.cpp: Gemma 3's and Phi-3's norms, gated activations and decode steps

    declare(lib)


def load_variant(which: str) -> ctypes.CDLL:
    """One kernel variant's library, built and loaded (cached); RuntimeError where this machine
    cannot run it (the CPU's flags are checked first: an AVX512 library is never loaded on a CPU
    without AVX512)."""
    if which not in VARIANTS:
        raise RuntimeError(f"unknown kernel variant {which!r} (one of {', '.join(VARIANTS)})")
    with _lock:
        if which in _libs:
            lib = _libs[which]
            if lib is None:
                raise RuntimeError(f"the {which} kernel failed to load earlier")
            return lib
        _libs[which] = None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError(f"the kernel is for x86-64 CPUs, not {platform.machine()}")
        if which not in cpu_variants():
            raise RuntimeError(f"this CPU lacks the {which} kernel's instructions"
                               + (" (AVX512-VNNI)" if which == "avx512" else " (AVX2, FMA, F16C)"))
        try:
            lib = ctypes.CDLL(str(build(which=which)))
        except OSError as e:
            raise RuntimeError(str(e)) from e
        if not lib.slm_supported():
            raise RuntimeError(f"this CPU lacks the {which} kernel's instructions")
        _declare(lib)
        _libs[which] = lib
        return lib


def get_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot run here.
    SLMKIT_KERNEL: 0 / off / false / no (envflags) forces the PyTorch fallback; avx2 or avx512 forces that
    variant (None if it cannot run here); anything else takes the best one the CPU runs."""
    global _lib, _tried, build_error, variant
    env = os.environ.get("SLMKIT_KERNEL", "1").strip().lower()
    if is_off(env):
        return None
    if _tried:
        return _lib
    wanted = [env] if env in VARIANTS else (cpu_variants() or ["avx512"])
    errors = []
    for which in wanted:
        try:
            lib = load_variant(which)
        except RuntimeError as e:
            errors.append(str(e))
            continue
        _lib, variant, _tried = lib, which, True
        return lib
    build_error = "; ".join(errors)
    _lib, variant, _tried = None, None, True
    return None


_has: dict[tuple[int, str], bool] = {}


def kernel_has(lib: ctypes.CDLL, symbol: str) -> bool:
    """Whether the loaded library exports `symbol`. A weight format whose kernel exists in one
    variant only (its own entry point, built into the AVX512 library but not the AVX2 one) names its
    entry point, and its module runs the PyTorch fallback where this is False."""
    key = (id(lib), symbol)
    if key not in _has:
        _has[key] = hasattr(lib, symbol)
    return _has[key]


def qgemm_weight_args(qw: QuantWeight) -> tuple[Any, ...]:
    """slm_qgemm's arguments that describe the weight (pointers into its buffers and its shape):
    computed once per weight by a caller that keeps them (QuantLinear), not once per call."""
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return (qw.k, qw.k, qw.qweight.data_ptr(), qw.scales.data_ptr(), ptr(qw.mins), qw.scale_kind,
            ptr(qw.super_scales), ptr(qw.super_mins), qw.per_super, qw.bits, qw.tiles, qw.kp, qw.group, qw.zero, qw.n)


def qmatmul_kernel(lib: ctypes.CDLL, x: torch.Tensor, qw: QuantWeight, out_dtype: torch.dtype,
                   weight_args: tuple[Any, ...] | None = None) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16, CPU) @ W.T -> [M, N] in out_dtype (float32 or bfloat16).
    weight_args: qgemm_weight_args(qw), when the caller keeps it (the same for every call)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    m, n = x.shape[0], qw.n
    out = torch.empty(m, n, dtype=out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32)
    rc = lib.slm_qgemm(x.data_ptr(), int(x.dtype == torch.bfloat16), m, *(weight_args or qgemm_weight_args(qw)),
                       out.data_ptr(), int(out.dtype == torch.bfloat16), n, threads_for(m * n * qw.k))
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
decode_attention_enabled = not is_off(os.environ.get("SLMKIT_DECODE_ATTN"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, qpos: torch.Tensor | None,
                     window: int | None, scale: float) -> torch.Tensor | None:
    """S new queries per row: q [B, H, S, D], k / v [B, Hkv, L, D] (any strides, last dim contiguous,
    H a multiple of Hkv) -> [B, H, S, D], or None where the kernel cannot take it (the caller then
    uses SDPA). Query s of row b sits at position qpos[b, s] (None: L - S + s, every row) and sees
    keys j <= its position with, given a window W, j > position - W. float32 throughout, output in
    q's dtype. Each query's result is the same bits whatever the batch, S or L (see attn.cpp)."""
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
