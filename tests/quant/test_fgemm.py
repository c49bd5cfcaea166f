"""The matmuls are row-count invariant: a row's result is the same bits whatever other rows share
the call (M = 1 in a decode step, a few in a batch, many in a prefill). The float kernel against
float64, and the swap of a model's float linears for it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkit.kernels.qgemm import fmatmul_kernel, get_kernel, pack_float_weight, qmatmul_kernel, unpack_float_weight
from slmkit.loading.packing import KernelLinear, PackedKernelLinear, pack_linears
from slmkit.quant.format import quantize

pytestmark = [pytest.mark.skipif(get_kernel() is None, reason="the compiled kernel is unavailable here"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (16, 32), (37, 50), (100, 63), (2048, 640), (200, 3072)]  # (n, k): N off the tile, odd K


def slices(m: int) -> list[tuple[int, int]]:
    """Ways to cut m rows into calls: one by one, in 2 + rest, in 3s, all at once."""
    cuts = [[(i, i + 1) for i in range(m)], [(0, 2), (2, m)], [(i, min(m, i + 3)) for i in range(0, m, 3)]]
    return [c for cut in cuts for c in cut]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_float_kernel_rows_do_not_depend_on_the_row_count(dtype, n, k, layout):
    lib = get_kernel()
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(17, k, generator=g).to(dtype)
    if layout == "packed":
        packed = pack_float_weight(lib, w)
        assert torch.equal(unpack_float_weight(packed, n, k), w)

        def mm(x, b=None):
            return fmatmul_kernel(lib, x, packed, b, n=n)
    else:
        def mm(x, b=None):
            return fmatmul_kernel(lib, x, w, b)
    for b in (None, bias):
        full = mm(x, b)
        assert full.dtype == dtype and full.shape == (17, n)
        for lo, hi in slices(17):
            assert torch.equal(mm(x[lo:hi], b), full[lo:hi])
    want = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    got = mm(x)
    if dtype == torch.float32:
        assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-7).all()
    else:  # float32 sums (of exact products), rounded once to the 16-bit dtype
        eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert ((got.double() - want).abs() <= eps * want.abs() + 1e-5 * scale + 1e-6).all()
    if bias is not None:  # the bias is added to the rounded product, in the dtype, as F.linear does
        assert torch.equal(mm(x, bias), (got.float() + bias.float()).to(dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_quantized_kernel_rows_do_not_depend_on_the_row_count(bits, out):
    """qgemm tiles 1, 2 and 3+ rows differently; each row's sums still run group by group in order."""
    lib = get_kernel()
    g = torch.Generator().manual_seed(bits)
    qw = quantize(torch.randn(90, 320, generator=g) * 0.05, bits, 32)
    x = torch.randn(17, 320, generator=g).to(out)
    full = qmatmul_kernel(lib, x, qw, out)
    for lo, hi in slices(17):
        assert torch.equal(qmatmul_kernel(lib, x[lo:hi], qw, out), full[lo:hi])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_linears_swaps_float_linears_for_the_kernel(dtype):
    torch.manual_seed(0)
    emb = nn.Embedding(24, 40)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24, bias=False)).to(dtype)
    model.add_module("emb", emb.to(dtype))
    model[2].weight = model.emb.weight  # tied: the head reads the embedding
    x = torch.randn(5, 3, 48).to(dtype)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        want = model[2](model[1](model[0](x)))
        assert pack_linears(model) == 2
        assert isinstance(model[0], PackedKernelLinear)
        if dtype == torch.bfloat16:  # copied into tiles, as oneDNN's packing did
            assert isinstance(model[2], PackedKernelLinear)
        else:  # the tied weight is read in place, not copied
            assert isinstance(model[2], KernelLinear) and model[2].weight is model.emb.weight
        got = model[2](model[1](model[0](x)))
        assert got.shape == want.shape and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        one = model[2](model[1](model[0](x[1:2])))
        assert torch.equal(one, got[1:2])  # one sequence alone: the same bits
    assert torch.equal(model[0].weight, w0)  # given back as [N, K] for whoever inspects it
