"""CPU weight pre-packing: a post-load pass that swaps bf16 `nn.Linear`s for oneDNN-packed ones.

Measured on this project's 2-core AVX512-BF16 machine (benchmarks/gemv.py): a single-token
decode through the five Phi-3-mini linear shapes reads weights at ~25-27 GB/s with oneDNN's
pre-blocked layout, ~19-20 GB/s with `F.linear` and ~16 GB/s with `torch.mv`; prefill GEMMs
are as fast either way. Packing is a layout change only (same bf16 values, same results up to
bf16 output rounding). Where oneDNN is missing the model keeps plain `nn.Linear` (the
pure-PyTorch path, also tested), and model code never knows which it runs.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .memory import FileMappings, release_pages


def packing_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and os.environ.get("SLMKIT_NO_PACK", "") in ("", "0"))


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


def pack_linears(model: nn.Module) -> int:
    """Swap every bf16 CPU nn.Linear of `model` for a PackedLinear; returns how many were swapped."""
    if not packing_available():
        return 0
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16
            and child.weight.device.type == "cpu"]
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
