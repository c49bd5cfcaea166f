"""CPU linear pass after load: swaps float `nn.Linear`s for faster or batch-invariant ones.

Where the compiled kernels run (AVX512, or AVX2 + FMA + F16C), every float32 / bfloat16 / float16 linear goes through
fgemm.cpp (`PackedKernelLinear`, its weight re-laid in tiles; `KernelLinear` reading a shared
float32 / float16 weight such as a tied embedding in place): each output is a fixed sequence of float32 operations,
so a row's result never depends on how many rows share the call. Greedy decoding needs that to
give the same tokens for a request alone, batched with 15 others, prefilled in chunks or started
from a kept prefix (BLAS and oneDNN choose their blocking, and a GEMV for one row, from the shape,
and near-tied logits then flip). Its speed: benchmarks/gemv.py.

Elsewhere, bf16 linears become oneDNN-packed ones. Measured on this project's 2-core AVX512-BF16
machine (benchmarks/gemv.py): a single-token decode through the five Phi-3-mini linear shapes reads
weights at ~25-27 GB/s with oneDNN's pre-blocked layout, ~19-20 GB/s with `F.linear` and ~16 GB/s
with `torch.mv`; prefill GEMMs are as fast either way. Packing is a layout change only (same bf16
values, same results up to bf16 output rounding). Where neither is available the model keeps plain
`nn.Linear` (the pure-PyTorch path, also tested), and model code never knows which it runs.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..envflags import is_off
from ..kernels.qgemm import FLOAT_DTYPES, fmatmul_kernel, get_kernel, pack_float_weight, unpack_float_weight
from ..models import keep_float_modules, keep_mapped_modules
from .memory import FileMappings, release_pages


def _no_pack() -> bool:
    """SLMKIT_NO_PACK set to anything but an off word (envflags) or nothing: float linears stay unpacked."""
    env = os.environ.get("SLMKIT_NO_PACK", "")
    return bool(env.strip()) and not is_off(env)


def packing_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and not _no_pack())


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (opaque; no `.weight` tensor)."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed, self.bias = packed, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                               self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def _lib() -> ctypes.CDLL:
    """The loaded kernel library: these modules exist only where it loaded."""
    lib = get_kernel()
    assert lib is not None
    return lib


class KernelLinear(nn.Linear):
    """nn.Linear whose forward runs the batch-invariant float kernel on its weight in place (for a
    float32 / float16 weight another module shares, a tied embedding: no second copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = fmatmul_kernel(_lib(), x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*lead, self.out_features)


class PackedKernelLinear(nn.Module):
    """y = x @ W.T + b through the batch-invariant float kernel, W in its tiled layout (a frozen
    parameter; counts include the zero rows padding N to 16); `.weight` gives W back as [N, K]."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return unpack_float_weight(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = fmatmul_kernel(_lib(), x.reshape(-1, self.in_features), self.packed, self.bias,
                           n=self.out_features)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=fgemm"


def kernel_linears_available() -> bool:
    return get_kernel() is not None and not _no_pack()


def _kernel_linears(model: nn.Module) -> int:
    """Swap every float CPU nn.Linear for a PackedKernelLinear (its weight dropped once copied), or
    for a KernelLinear over the same weight where another module shares a float32 / float16 one."""
    lib = get_kernel()
    assert lib is not None  # the caller checked kernel_linears_available()
    skip = keep_float_modules(model)  # a vision tower runs its big GEMMs through oneDNN as it is
    mapped = keep_mapped_modules(model)  # MoE experts: read in place (float32/16) or left as they are (bf16)
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype in FLOAT_DTYPES and child.weight.device.type == "cpu"
            and id(child) not in skip and not (id(child) in mapped and child.weight.dtype == torch.bfloat16)]
    maps = FileMappings()
    swapped = {id(lin) for _, _, lin in todo}
    keep = {p.data_ptr() for m in model.modules() if id(m) not in swapped for p in m.parameters(recurse=False)}
    keep |= {lin.weight.data_ptr() for _, _, lin in todo if id(lin) in mapped}
    n = len(todo)
    todo.reverse()
    while todo:  # popped, so each original is freed once replaced: memory holds one copy plus a linear
        parent, name, lin = todo.pop()
        # a shared float32 / float16 weight is read in place, as plain nn.Linear did (no second copy;
        # for the float32 Gemma head faster than BLAS here); a bf16 one is copied into tiles, as the
        # oneDNN packing did (twice the speed of reading it in place)
        if lin.weight.data_ptr() in keep and lin.weight.stride(-1) == 1 and lin.weight.dtype != torch.bfloat16:
            new = KernelLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
            new.weight, new.bias = lin.weight, lin.bias
            setattr(parent, name, new)
        else:
            bias = None if lin.bias is None else lin.bias.detach().clone()
            setattr(parent, name, PackedKernelLinear(lin.in_features, lin.out_features,
                                                     pack_float_weight(lib, lin.weight.detach()), bias))
            if lin.weight.data_ptr() not in keep:
                release_pages(lin.weight, maps)
        del parent, lin
    return n


def pack_linears(model: nn.Module) -> int:
    """Swap every float CPU nn.Linear of `model` for a (Packed)KernelLinear where the kernels run, else
    every bf16 one for a PackedLinear; returns how many were swapped."""
    if kernel_linears_available():
        return _kernel_linears(model)
    if not packing_available():
        return 0
    skip = keep_float_modules(model) | keep_mapped_modules(model)
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16
            and child.weight.device.type == "cpu" and id(child) not in skip]
    if not todo:
        return 0
    maps = FileMappings()
    swapped = {id(lin) for _, _, lin in todo}
    keep = {p.data_ptr() for m in model.modules() if id(m) not in swapped for p in m.parameters(recurse=False)}

    def pack(lin: nn.Linear) -> PackedLinear:
        bias = None if lin.bias is None else lin.bias.detach().clone()
        packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
        return PackedLinear(lin.in_features, lin.out_features, packed, bias)

    # oneDNN's reorder runs best single-threaded: one per core side by side (measured 2.1 vs 1.0 GB/s).
    # That needs torch's thread count at 1, a process-wide setting that threads started meanwhile
    # would keep for life -- so only when this is the only Python thread; otherwise one at a time.
    # Work in rounds and drop each original as soon as its packed copy is in place, so memory holds
    # one copy of the weights plus a round, never two full copies.
    threads = torch.get_num_threads()
    alone = threading.active_count() == 1
    workers = threads if alone else 1
    n = len(todo)
    if alone:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            while todo:
                batch, todo = todo[:workers], todo[workers:]
                for (parent, name, lin), packed in zip(batch, ex.map(pack, [lin for _, _, lin in batch])):
                    setattr(parent, name, packed)
                    if lin.weight.data_ptr() not in keep:  # a tied embedding still reads these pages
                        release_pages(lin.weight, maps)
                del batch, parent, lin, packed
    finally:
        if alone:
            torch.set_num_threads(threads)
    return n
