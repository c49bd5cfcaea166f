"""Building blocks shared by the architectures: norm, linear with a GEMV decode path, attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times weight (transformers' order).

    `offset` = 1.0 gives Gemma's (1 + weight) form, computed in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class Linear(nn.Linear):
    """nn.Linear whose single-row bf16 CPU case runs as a 1-D GEMV.

    Decode is bound by weight reads: `torch.mv` reads bf16 weights at ~26 GB/s here while
    `F.linear` on a [1, K] input manages ~16 (../shared/specs/performance-anchors.md).
    Quantization passes swap these modules out, so model code never branches on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.numel() == self.in_features and w.dtype == torch.bfloat16 and w.device.type == "cpu":
            y = torch.mv(w, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, offset: int, window: int | None, scale: float
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of S new queries at positions offset.. .

    q: [B, H, S, D]; k, v: [B, Hkv, L, D] with L = offset + S -> [B, H, S, D].
    A query at position p sees keys j with j <= p and, with a window W, j > p - W.
    """
    S, L = q.shape[2], k.shape[2]
    windowed = window is not None and L > window
    mask, causal = None, False
    if not windowed and S == 1:
        pass  # the single new token sees everything before it
    elif not windowed and offset == 0:
        causal = True
    else:
        qpos = torch.arange(offset, offset + S, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask = mask & (kpos > qpos - window)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}
