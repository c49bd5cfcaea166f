"""apply_rope through the kernel (kernels/fused.py rope): the bits of its torch ops, for shared and
per-row cos / sin, partial rotary and strided queries; None (torch's ops) where it cannot take them."""
from __future__ import annotations

import pytest
import torch

from slmkit.kernels import fused
from slmkit.models.rope import apply_rope
from slmkit.quant.linear import use_kernel

pytestmark = pytest.mark.skipif(fused.kernel_lib() is None, reason="the compiled kernel is unavailable here")


def torch_rope(x, cos, sin):
    """apply_rope through its torch ops (the kernels switched off)."""
    with use_kernel(False):
        assert fused.rope(x, cos, sin) is None
        return apply_rope(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,S,D,rd,rows", [(2, 4, 7, 64, 64, 0), (3, 8, 5, 96, 48, 3), (1, 4, 600, 96, 96, 1),
                                             (2, 2, 3, 128, 32, 1), (1, 1, 1, 2, 2, 0)])
def test_kernel_rope_is_torch_rope_bit_for_bit(dtype, B, H, S, D, rd, rows):
    g = torch.Generator().manual_seed(B * S + D)
    x = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)  # [B, H, S, D] as the models view it
    shape = (S, rd) if rows == 0 else (rows, S, rd)
    cos, sin = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    got = fused.rope(x, cos, sin)
    assert got is not None and got.shape == (B, H, S, D) and got.dtype == dtype
    want = torch_rope(x, cos, sin)
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.contiguous().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(apply_rope(x, cos, sin), want)


def test_kernel_rope_declines_what_it_cannot_take():
    x = torch.randn(1, 2, 3, 8)
    cos = sin = torch.randn(3, 8)
    assert fused.rope(x, cos.double(), sin.double()) is None  # dtypes differ
    assert fused.rope(x.double(), cos.double(), sin.double()) is None  # float64
    assert fused.rope(x, cos[:, :3], sin[:, :3]) is None  # odd rotary dims
    assert fused.rope(x, torch.randn(4, 8), torch.randn(4, 8)) is None  # positions differ
    assert fused.rope(x, torch.randn(2, 3, 8), torch.randn(2, 3, 8)) is None  # 2 rows of cos for 1 row of x
    assert fused.rope(x.requires_grad_(), cos, sin) is None  # autograd: torch's ops
    # torch's ops then: x * cos + rotate_half(x) * sin
    xd, cd, sd = x.detach().double(), cos.double(), sin.double()
    torch.testing.assert_close(apply_rope(xd, cd, sd), xd * cd + torch.cat((-xd[..., 4:], xd[..., :4]), -1) * sd)
