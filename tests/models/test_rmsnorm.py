"""RMSNorm without the compiled kernel runs torch's rms_norm: it must give the written-out float32
ops' bits, for both weight orders (Llama/Phi: cast, then weight; Gemma: float32 (offset + weight),
then cast). With the kernel, the Llama order runs kernels/fused.cpp's norm (tests/models/
test_phi3_fused.py: within float32 rounding of these ops)."""
from __future__ import annotations

import pytest
import torch

from slmkit.models.layers import RMSNorm
from slmkit.quant.linear import use_kernel


def written_out(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.fp32_weight:
        return (h * (norm.offset + norm.weight.float())).to(x.dtype)
    return norm.weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_equals_the_written_out_ops(dtype, gemma):
    g = torch.Generator().manual_seed(0)
    for dim, scale, eps in ((640, 1.0, 1e-6), (3072, 30.0, 1e-5), (256, 1e-3, 1e-6), (96, 5.0, 1e-5)):
        norm = RMSNorm(dim, eps, offset=1.0 if gemma else 0.0, fp32_weight=gemma)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=g))
        norm = norm.to(dtype) if not gemma else norm
        x = (torch.randn(3, 7, dim, generator=g) * scale).to(dtype)
        with torch.no_grad(), use_kernel(False):
            assert torch.equal(norm(x), written_out(norm, x))
