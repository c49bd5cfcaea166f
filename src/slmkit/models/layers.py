"""Building blocks shared by the architectures: RMSNorm, attention, activations."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused
from ..kernels.qgemm import decode_attention
from .cache import Aligned, Ragged


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, then the weight, in transformers' order per family.

    Llama/Phi: cast back to the input dtype, then times weight (through the compiled kernel where it
    runs, kernels/fused.py: Phi-3's fused decode step shares its code; torch's ops agree within
    float32 rounding). Gemma (`fp32_weight=True`): times
    (offset + weight) in float32, then cast; offset is 1 for HF checkpoints (weights stored as
    w - 1) and 0 for llama.cpp's GGUF files, whose converter already added the 1.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0, fp32_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.fp32_weight = eps, offset, fp32_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32_weight and not self.offset:  # the compiled kernel's: a fused decode step's own bits
            y = fused.rms_norm(x, self.weight, self.eps, llama=True)
            if y is not None:
                return y
        dtype = x.dtype
        # torch's rms_norm: x * rsqrt(mean(x^2) + eps), the same float32 bits as the written-out ops
        # (tested), in fewer dispatches (a decode step runs 100+ norms)
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        if self.fp32_weight:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: Aligned | Ragged, *, window: int | None, scale: float,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of S new queries at the span's positions.

    q: [B, H, S, D]; k, v: [B, Hkv, L, D] -> [B, H, S, D]; Aligned: L = offset + S in every row.
    A query at position p sees keys j with j <= p and, with a window W, j > p - W.
    Rows at different lengths (Ragged, continuous batching): the query positions are per row;
    keys past a row's own length are masked.
    """
    offset, qpos = (None, span.positions) if isinstance(span, Ragged) else (span.offset, None)
    S, L = q.shape[2], k.shape[2]
    if qpos is not None and offset is None or offset == L - S:
        # the compiled kernel (any strides): every query's result is the same bits in a decode step,
        # a batch of rows or a prefill chunk of any size, so greedy tokens do not depend on how
        # requests were batched or prompts chunked. Where it is missing, SDPA below.
        out = decode_attention(q, k, v, qpos=qpos if offset is None else None, window=window, scale=scale)
        if out is not None:
            return out
    windowed = window is not None and L > window
    mask, causal = None, False
    if qpos is not None and offset is None:
        kpos = torch.arange(L, device=q.device)
        mask = kpos <= qpos[:, :, None]
        if window is not None:
            mask = mask & (kpos > qpos[:, :, None] - window)
        mask = mask[:, None]  # [B, 1, S, L]
    elif not windowed and S == 1:
        pass  # the single new token sees everything before it
    elif not windowed and offset == 0:
        causal = True
    else:
        assert offset is not None  # a Ragged span took the first branch
        qp = torch.arange(offset, offset + S, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = kpos <= qp
        if window is not None:
            mask = mask & (kpos > qp - window)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}
