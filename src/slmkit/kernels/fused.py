"""fused.cpp from Python: Gemma 3's and Phi-3's norms and gated activations in one call each, and
their whole decode steps (every layer) in one call. Each returns None where the kernel cannot take the input (no
kernel, switched off, a dtype or layout it lacks, autograd): the caller then runs torch's ops.

The norms and GeGLU here and the decode step share their C++ functions, so the per-op path and
the fused step give a token the same bits (tests/models/test_gemma3_fused.py); torch's own ops
(SLMKIT_KERNEL=0) agree within float32 rounding (the norm: ~1e-6 relative; GeGLU's tanh: ~5e-7
absolute, as torch's own float32 tanh GELU).
"""
from __future__ import annotations

import ctypes
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..envflags import is_off
from .qgemm import get_kernel, kernel_has, qgemm_weight_args

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_FUSED_TOKENS = 16  # new tokens a fused step takes (a decode step: 1; a verification: 1 + its drafts)
QGEMM_WEIGHT_ARGS = 15  # fused.cpp's qmm: slm_qgemm's weight arguments (qgemm.py qgemm_weight_args)
LAYER_WORDS = 7 * QGEMM_WEIGHT_ARGS + 6 + 2  # fused.cpp per layer: 7 linears, 6 norm weights, window, local rope
PHI3_LAYER_WORDS = 4 * QGEMM_WEIGHT_ARGS + 2  # slm_phi3_decode per layer: 4 linears, 2 norm weights
# SLMKIT_FUSED_DECODE=0: decode through the per-op path (the fused step's reference, and a switch for benchmarks)
fused_decode_enabled = not is_off(os.environ.get("SLMKIT_FUSED_DECODE"))


# Bumped by torch's global registration hooks whenever any module registers or replaces a
# parameter, buffer or submodule (assignment, register_*, load_state_dict(assign=True)).
_epoch = [0]


def _bump(*_: Any) -> None:
    _epoch[0] += 1


for _register in (torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_bump)


def declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.slm_rms_norm.restype = lib.slm_geglu.restype = lib.slm_gemma3_decode.restype = c_int
    lib.slm_silu_mul.restype = lib.slm_phi3_decode.restype = lib.slm_rope.restype = c_int
    lib.slm_rms_norm.argtypes = [c_int, i64, i64, ptr, i64, ptr, c_int, c_float, c_float, ptr, i64, ptr, i64, c_int]
    lib.slm_geglu.argtypes = [c_int, i64, ptr, ptr, ptr]
    lib.slm_silu_mul.argtypes = [c_int, i64, i64, ptr, ptr, i64, ptr]
    lib.slm_phi3_decode.argtypes = [c_int, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr,
                                    c_int, c_float, c_float, i64, ptr, ptr, ptr, c_int]
    lib.slm_rope.argtypes = [c_int, i64, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    lib.slm_argmax.restype = i64
    lib.slm_argmax.argtypes = [ptr, i64]
    lib.slm_gemma3_decode.argtypes = [c_int, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, c_int,
                                      c_float, c_float, c_float, ptr, ptr, ptr, c_int]


def kernel_lib() -> ctypes.CDLL | None:
    """The kernel library with fused.cpp's entry points; None where there is none or the kernels are
    switched off (SLMKIT_KERNEL=0, or quant.linear.use_kernel(False), which switches these off too)."""
    from ..quant import linear

    lib = get_kernel() if linear._kernel_enabled else None
    return lib if lib is not None and kernel_has(lib, "slm_phi3_decode") else None


def _lib(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library where these tensors can go to it (CPU, float32 / bfloat16, no autograd)."""
    lib = kernel_lib()
    if lib is None:
        return None
    if any(t.device.type != "cpu" or t.dtype not in DTYPES for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None, *, llama: bool = False) -> torch.Tensor | None:
    """Gemma's RMSNorm of x [..., n] (times offset + weight in float32, rounded to x's dtype), plus
    `residual` (x's shape and dtype) when given: residual + norm(x). llama: Llama's / Phi's instead
    (the normalized x rounded to its dtype, times weight; a weight of x's dtype, no offset or
    residual). None where the kernel cannot."""
    lib = _lib(x, weight) if residual is None else _lib(x, weight, residual)
    n = x.shape[-1]
    if lib is None or weight.shape != (n,) or (residual is not None and (
            residual.shape != x.shape or residual.dtype != x.dtype)):
        return None
    if llama and (weight.dtype != x.dtype or residual is not None or offset):
        return None
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype)
    rc = lib.slm_rms_norm(DTYPES[x.dtype], x2.shape[0], n, x2.data_ptr(), x2.stride(0), weight.data_ptr(),
                          DTYPES[weight.dtype], offset, eps, None if r2 is None else r2.data_ptr(), n,
                          out.data_ptr(), n, int(llama))
    if rc:
        raise RuntimeError(f"slm_rms_norm failed with code {rc}")
    return out.view(x.shape)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """gelu_tanh(gate) * up, each rounded to the dtype; None where the kernel cannot."""
    lib = _lib(gate, up)
    if lib is None or gate.shape != up.shape or gate.dtype != up.dtype:
        return None
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    rc = lib.slm_geglu(DTYPES[g.dtype], g.numel(), g.data_ptr(), u.data_ptr(), out.data_ptr())
    if rc:
        raise RuntimeError(f"slm_geglu failed with code {rc}")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of gate_up [..., 2n] (gate first, as Phi-3's gate_up_proj writes them), each
    rounded to the dtype: [..., n]. None where the kernel cannot."""
    lib = _lib(gate_up)
    if lib is None or gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        return None
    n = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n)
    if x.shape[0] > 1 and x.stride(0) != 2 * n:
        x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = lib.slm_silu_mul(DTYPES[x.dtype], x.shape[0], n, x.data_ptr(), x.data_ptr() + n * x.element_size(),
                          2 * n, out.data_ptr())
    if rc:
        raise RuntimeError(f"slm_silu_mul failed with code {rc}")
    return out.view(*gate_up.shape[:-1], n)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """models/rope.py apply_rope (x [B, H, S, D]; cos, sin [S, rd] or [1 or B, S, rd], rd <= D) through
    the kernel: the same bits as its torch ops, a contiguous result. None where the kernel cannot."""
    lib = _lib(x, cos, sin)
    if lib is None or x.dim() != 4 or x.stride(-1) != 1 or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    B, H, S, D = x.shape
    rd = cos.shape[-1]
    rows = cos.shape[0] if cos.dim() == 3 else 1
    if (cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != S or rows not in (1, B)
            or rd % 2 or not 2 <= rd <= D):
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(B, H, S, D, dtype=x.dtype)
    rc = lib.slm_rope(DTYPES[x.dtype], B, H, S, D, rd, x.data_ptr(), x.stride(0), x.stride(1), x.stride(2),
                      cos.data_ptr(), sin.data_ptr(), S * rd if rows > 1 else 0, out.data_ptr())
    if rc:
        raise RuntimeError(f"slm_rope failed with code {rc}")
    return out


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(x, dim=-1) of float32 logits [B, V] in one pass per row, one thread; None where
    the kernel cannot take them or a row has a NaN or a largest that is not finite (the caller then
    runs sampling.finite_choice's checks)."""
    lib = kernel_lib()
    if lib is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1 \
            or x.shape[1] == 0:
        return None
    base, step, n = x.data_ptr(), x.stride(0) * 4, x.shape[1]
    ids = [lib.slm_argmax(base + r * step, n) for r in range(x.shape[0])]
    return None if min(ids) < 0 else torch.tensor(ids, dtype=torch.long)


@dataclass
class DecodePlan:
    """What slm_gemma3_decode reads for every layer, built once per model (kernels/fused.cpp)."""
    lib: ctypes.CDLL
    layers: torch.Tensor  # [n_layers, LAYER_WORDS] int64
    dims: tuple[int, ...]  # n_layers, hidden, heads, kv_heads, head_dim, intermediate (Phi-3: + rotary dims, window)
    wdt: int  # the norm weights' dtype
    offset: float
    eps: float
    scale: float
    # what the plan read, as (a module's _parameters / _buffers / _modules, name, the thing) in 3 lists
    dicts: list[dict]
    names: list[str]
    things: list[Any]
    norms: list[torch.Tensor]  # the norm weights and where their data was (a .to() moves a
    norm_ptrs: list[int]       # parameter's data in place)
    checked: int = -1  # the registration epoch at which all of the above was last found in place

    def valid(self, lib: ctypes.CDLL | None) -> bool:
        """Whether every tensor and module the plan read is still in place (none swapped, no norm
        weight moved). Checked item by item only when some module registered or replaced a
        parameter, buffer or submodule since the last check (~1000 objects: 0.25 ms a step once the
        output head has streamed them out of the caches); the whole model's .to() drops the plan
        (gemma3.Model._apply). Not seen: a layer's own .to() or a tensor's .data replaced by hand."""
        if lib is not self.lib:
            return False
        if self.checked != _epoch[0]:
            if not (all(map(operator.is_, map(dict.get, self.dicts, self.names), self.things))
                    and list(map(torch.Tensor.data_ptr, self.norms)) == self.norm_ptrs):
                return False
            self.checked = _epoch[0]
        return True


def step_lib(h: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library where a fused decode step may run on h [B, S, hidden]: one row, the fused
    step and the compiled attention switched on, no autograd (whose per-op norms are torch's)."""
    from .qgemm import decode_attention_enabled

    lib = kernel_lib()
    if lib is None or not fused_decode_enabled or not decode_attention_enabled or h.shape[0] != 1 \
            or torch.is_grad_enabled():
        return None
    return lib


class PlanCache:
    """A model's fused-step plan: built once, kept while valid (DecodePlan.valid), rebuilt for another
    kernel library or for another object (a deepcopy carries the cache along, pointing into the
    original's weights). A model that cannot run fused keeps its None (not retried). clear() after
    .to() and the like, which move the weights the plan points into."""

    def __init__(self) -> None:
        self._entry: tuple[int, ctypes.CDLL, DecodePlan | None] | None = None

    def clear(self) -> None:
        self._entry = None

    @property
    def decided(self) -> bool:
        """Whether a plan (or that there is none) is kept."""
        return self._entry is not None

    @property
    def plan(self) -> DecodePlan | None:
        return None if self._entry is None else self._entry[2]

    def get(self, owner: object, lib: ctypes.CDLL, build: Callable[[], DecodePlan | None]) -> DecodePlan | None:
        e = self._entry
        if e is None or e[0] != id(owner) or e[1] is not lib or (e[2] is not None and not e[2].valid(lib)):
            e = self._entry = (id(owner), lib, build())
        return e[2]

    def __getstate__(self) -> dict[str, Any]:
        return {"_entry": None}  # a copy (deepcopy, pickle) builds its own


def _linear_args(lin: nn.Module, refs: list) -> tuple[Any, ...] | None:
    from ..quant.linear import _WEIGHT_BUFFERS, QuantLinear

    if type(lin) is not QuantLinear or lin.kernel_symbol != "slm_qgemm" or lin.bias is not None:
        return None
    qw = lin.weight_q
    if qw.qweight.device.type != "cpu":
        return None
    args = qgemm_weight_args(qw)
    if len(args) != QGEMM_WEIGHT_ARGS:  # slm_qgemm's signature moved on without fused.cpp: run per op
        return None
    refs.extend((lin._buffers, name, lin._buffers[name]) for name in _WEIGHT_BUFFERS)
    return tuple(0 if a is None else int(a) for a in args)


def gemma3_plan(layers: Sequence[Any], final_norm: Any, args: Any) -> DecodePlan | None:
    """The plan for Gemma 3 decoder layers and the final norm (models/gemma3.py DecoderLayer,
    GemmaNorm, ModelArgs), or None where they cannot run fused: a linear that is not a plain
    QuantLinear on slm_qgemm, another activation than tanh GELU, norm weights of another dtype,
    partial rotary, no kernel."""
    lib = kernel_lib()
    if (lib is None or args.head_dim % 2 or args.num_attention_heads // args.num_key_value_heads > 64
            or any(not layer.mlp.tanh_gelu or layer.self_attn.scale != layers[0].self_attn.scale for layer in layers)):
        return None
    if any(r.rotary_dim != args.head_dim for r in (args.rope_global, args.rope_local)):
        return None
    rows: list[list[int]] = []
    refs: list[tuple[dict, str, Any]] = []
    norm_refs: list[tuple[dict, str, Any]] = []
    wdts: set[torch.dtype] = set()
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        lin = [_linear_args(m, refs) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj,
                                              mlp.up_proj, mlp.down_proj)]
        norms = [layer.input_layernorm, att.q_norm, att.k_norm, layer.post_attention_layernorm,
                 layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if any(a is None for a in lin) or any(
                not n.weight.is_contiguous() or n.weight.dtype not in DTYPES or n.weight.device.type != "cpu"
                or n.eps != args.rms_norm_eps or n.offset != args.norm_offset for n in norms):
            return None
        wdts.update(n.weight.dtype for n in norms)
        refs.extend((parent._modules, name, child) for parent in (layer, att, mlp)
                    for name, child in parent._modules.items())  # a module swapped later: rebuild
        norm_refs.extend((n._parameters, "weight", n.weight) for n in norms)
        rows.append([v for a in lin if a is not None for v in a] + [n.weight.data_ptr() for n in norms]
                    + [att.window or 0, int(att.sliding)])
    n = final_norm
    if (not n.weight.is_contiguous() or n.weight.device.type != "cpu" or n.eps != args.rms_norm_eps
            or n.offset != args.norm_offset):
        return None
    wdts.add(n.weight.dtype)
    norm_refs.append((n._parameters, "weight", n.weight))  # the last norm: gemma3_decode's final_w
    if len(wdts) != 1:
        return None
    assert all(len(r) == LAYER_WORDS for r in rows)
    a = args
    return _plan(lib, rows, (len(rows), a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                             a.intermediate_size), DTYPES[wdts.pop()], float(a.norm_offset), float(a.rms_norm_eps),
                 float(layers[0].self_attn.scale), refs, norm_refs)


def _plan(lib: ctypes.CDLL, rows: list[list[int]], dims: tuple[int, ...], wdt: int, offset: float, eps: float,
          scale: float, refs: list[tuple[dict, str, Any]], norm_refs: list[tuple[dict, str, Any]]) -> DecodePlan:
    dicts, names, things = (list(c) for c in zip(*(refs + norm_refs)))
    norm_ws = [t for _, _, t in norm_refs]
    return DecodePlan(lib, torch.tensor(rows, dtype=torch.int64), dims, wdt, offset, eps, scale, dicts, names,
                      things, norm_ws, [t.data_ptr() for t in norm_ws])


def phi3_plan(layers: Sequence[Any], final_norm: Any, args: Any) -> DecodePlan | None:
    """The plan for Phi-3 decoder layers and the final norm (models/phi3.py DecoderLayer, RMSNorm,
    ModelArgs), or None where they cannot run fused: a linear that is not a plain QuantLinear on
    slm_qgemm, another activation than SiLU, norm weights of mixed dtypes, no kernel."""
    lib = kernel_lib()
    rd = args.rope.rotary_dim
    if (lib is None or rd % 2 or rd > args.head_dim or args.num_attention_heads // args.num_key_value_heads > 64
            or args.hidden_act not in ("silu", "swish")):
        return None
    rows: list[list[int]] = []
    refs: list[tuple[dict, str, Any]] = []
    norm_refs: list[tuple[dict, str, Any]] = []
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        lin = [_linear_args(m, refs) for m in (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if any(a is None for a in lin) or any(n.fp32_weight or n.offset or n.eps != args.rms_norm_eps for n in norms):
            return None
        refs.extend((parent._modules, name, child) for parent in (layer, att, mlp)
                    for name, child in parent._modules.items())  # a module swapped later: rebuild
        norm_refs.extend((n._parameters, "weight", n.weight) for n in norms)
        rows.append([v for a in lin if a is not None for v in a] + [n.weight.data_ptr() for n in norms])
    norm_refs.append((final_norm._parameters, "weight", final_norm.weight))  # phi3_decode's final_w
    if (final_norm.fp32_weight or final_norm.offset or final_norm.eps != args.rms_norm_eps
            or any(not t.is_contiguous() or t.dtype not in DTYPES or t.device.type != "cpu" for _, _, t in norm_refs)
            or len({t.dtype for _, _, t in norm_refs}) != 1):
        return None
    assert all(len(r) == PHI3_LAYER_WORDS for r in rows)
    a = args
    return _plan(lib, rows, (len(rows), a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                             a.intermediate_size, rd, a.sliding_window or 0), DTYPES[norm_refs[0][2].dtype], 0.0,
                 float(a.rms_norm_eps), float(layers[0].self_attn.scale), refs, norm_refs)


def phi3_decode(plan: DecodePlan, h: torch.Tensor, k_cache: Sequence[torch.Tensor], v_cache: Sequence[torch.Tensor],
                pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """gemma3_decode for a Phi-3 plan: S new tokens of one row, h [1, S, hidden] in place, their
    final-normed states returned; cos, sin [S, rotary dims] in h's dtype. None where the inputs do
    not fit (the norm weights' dtype must be h's, as the per-op path's kernel norms need)."""
    n_layers, hidden, heads, kv_heads, D, inter, rd, window = plan.dims
    dt = DTYPES.get(h.dtype)
    S = h.shape[1] if h.dim() == 3 else 0
    if (dt != plan.wdt or not _fits(h, k_cache, v_cache, pos, n_layers, hidden, kv_heads, D)
            or any(t.shape != (S, rd) or t.dtype != h.dtype or not t.is_contiguous() for t in (cos, sin))):
        return None
    kv_ptrs = _kv_ptrs(k_cache, v_cache)
    normed = torch.empty_like(h)
    rc = plan.lib.slm_phi3_decode(dt, n_layers, hidden, heads, kv_heads, D, rd, inter, plan.layers.data_ptr(),
                                  kv_ptrs.data_ptr(), k_cache[0].shape[2], pos, S, cos.data_ptr(), sin.data_ptr(),
                                  plan.wdt, plan.eps, plan.scale, window, h.data_ptr(), plan.norm_ptrs[-1],
                                  normed.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"slm_phi3_decode failed with code {rc}")
    return normed


def _kv_ptrs(k_cache: Sequence[torch.Tensor], v_cache: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer its key and value cache's address, as the fused steps' kv argument reads them."""
    return torch.tensor([t.data_ptr() for kv in zip(k_cache, v_cache) for t in kv], dtype=torch.int64)


def _fits(h: torch.Tensor, k_cache: Sequence[torch.Tensor], v_cache: Sequence[torch.Tensor], pos: int,
          n_layers: int, hidden: int, kv_heads: int, D: int) -> bool:
    """Whether h [1, S, hidden] and the per-layer caches [1, kv_heads, cap, D] of its dtype can take
    S tokens at pos in a fused step."""
    S = h.shape[1] if h.dim() == 3 else 0
    if (h.dtype not in DTYPES or h.shape != (1, S, hidden) or not 1 <= S <= MAX_FUSED_TOKENS or not h.is_contiguous()
            or len(k_cache) != n_layers or len(v_cache) != n_layers):
        return False
    k0 = k_cache[0]  # (one cache allocates every layer's alike)
    return (k0.dtype == h.dtype and k0.shape[:2] == (1, kv_heads) and k0.shape[3] == D and k0.is_contiguous()
            and 0 <= pos and pos + S <= k0.shape[2])


def gemma3_decode(plan: DecodePlan, h: torch.Tensor, k_cache: Sequence[torch.Tensor],
                  v_cache: Sequence[torch.Tensor], pos: int, rope: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """S new tokens of one row (a decode step: 1; a speculative verification: the pending token and
    its drafts) through every layer, h [1, S, hidden] (contiguous, float32 / bfloat16) in place, and
    the final norm of the result, returned (h's shape and dtype). k_cache / v_cache: per layer
    [1, kv_heads, cap, head_dim] in h's dtype, written at pos..pos + S - 1; rope: cos, sin of the
    global table, then of the local one, [S, head_dim] each in h's dtype. None (nothing done) where
    the inputs do not fit."""
    n_layers, hidden, heads, kv_heads, D, inter = plan.dims
    dt = DTYPES.get(h.dtype)
    k0 = k_cache[0]
    S = h.shape[1] if h.dim() == 3 else 0
    if (not _fits(h, k_cache, v_cache, pos, n_layers, hidden, kv_heads, D)
            or any(t.shape != (S, D) or t.dtype != h.dtype or not t.is_contiguous() for t in rope)):
        return None
    kv_ptrs = _kv_ptrs(k_cache, v_cache)
    rope_ptrs = (ctypes.c_void_p * 4)(*(t.data_ptr() for t in rope))
    normed = torch.empty_like(h)
    rc = plan.lib.slm_gemma3_decode(dt, n_layers, hidden, heads, kv_heads, D, inter, plan.layers.data_ptr(),
                                    kv_ptrs.data_ptr(), k0.shape[2], pos, S, rope_ptrs, plan.wdt, plan.offset,
                                    plan.eps, plan.scale, h.data_ptr(), plan.norm_ptrs[-1], normed.data_ptr(),
                                    torch.get_num_threads())
    if rc:
        raise RuntimeError(f"slm_gemma3_decode failed with code {rc}")
    return normed
