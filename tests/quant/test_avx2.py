"""The AVX2 kernels (qgemm_avx2.cpp, attn_avx2.cpp, fgemm_avx2.cpp) against the AVX512 ones: the same
bits for every weight format, the attention and the float matmul (bfloat16 float matmuls excepted
where AVX512-BF16 pairs products: then within a stated tolerance); chosen by SLMKIT_KERNEL=avx2."""
from __future__ import annotations

import pytest
import torch

from slmkit.kernels import qgemm
from slmkit.kernels.qgemm import fmatmul_kernel, load_variant, pack_float_weight, qmatmul_kernel
from slmkit.quant.format import from_codes, qmatmul_reference

from .test_decode_attention import slot_views
from .test_kernel import SHAPES


def variant(name: str):
    try:
        return load_variant(name)
    except RuntimeError as e:
        pytest.skip(f"the {name} kernel cannot run here: {e}")


@pytest.fixture(scope="module")
def both():
    libs = variant("avx512"), variant("avx2")
    assert libs[0]._name != libs[1]._name  # two libraries, not one loaded twice
    return libs


def codes_weight(n, k, group, bits, scales, seed=2):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16 if bits == 4 else 256, (n, k), generator=g, dtype=torch.uint8)
    ng = -(-k // group)
    dt = torch.float32 if scales == "float32" else torch.float16
    s = (torch.rand(n, ng, generator=g) * 0.02).to(dt)
    mins = (torch.randn(n, ng, generator=g) * 0.05).to(dt) if scales == "mins" else None
    return from_codes(u, s, mins, bits=bits, group=group, zero=0 if mins is not None else (8 if bits == 4 else 128),
                      n=n, k=k)


@pytest.mark.parametrize("n,k,group,bits,m", SHAPES)
@pytest.mark.parametrize("scales", ["float16", "float32", "mins"])
@pytest.mark.parametrize("vnni", ["1", "0"])
def test_qgemm_same_bits_as_avx512_and_the_fallback(both, monkeypatch, n, k, group, bits, m, scales, vnni):
    """vnni=0 forces the vpmaddubsw path on a CPU with AVX-VNNI (elsewhere both runs take it)."""
    monkeypatch.setenv("SLMKIT_AVX_VNNI", vnni)
    avx512, avx2 = both
    qw = codes_weight(n, k, group, bits, scales)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)) * 3
    got = qmatmul_kernel(avx2, x, qw, torch.float32)
    assert torch.equal(got, qmatmul_kernel(avx512, x, qw, torch.float32))
    assert torch.equal(got, qmatmul_reference(x, qw))
    xb = x.bfloat16()
    assert torch.equal(qmatmul_kernel(avx2, xb, qw, torch.bfloat16), qmatmul_kernel(avx512, xb, qw, torch.bfloat16))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_qgemm_gguf_scale_kinds_same_bits(both, type_name):
    """The two-level (uint8 / int8 x float32) scales of the K-quants, and the GGUF block formats."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    shape = (72, 512)
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(3)))
                           .reshape(-1).copy())
    qw = repack(raw, int(Q[type_name]), shape)
    for m in (1, 2, 5):
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        got = qmatmul_kernel(both[1], x, qw, torch.float32)
        assert torch.equal(got, qmatmul_kernel(both[0], x, qw, torch.float32))
        assert torch.equal(got, qmatmul_reference(x, qw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 50), (100, 63), (300, 640)])
@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_fgemm_same_bits_as_avx512(both, dtype, n, k, layout):
    avx512, avx2 = both
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(7, k, generator=g).to(dtype)

    def mm(lib, rows, b):
        if layout == "packed":
            return fmatmul_kernel(lib, rows, pack_float_weight(lib, w), b, n=n)
        return fmatmul_kernel(lib, rows, w, b)

    for b in (None, bias):
        got = mm(avx2, x, b)
        for lo, hi in ((0, 1), (1, 3), (3, 7)):  # batch-invariant on its own
            assert torch.equal(mm(avx2, x[lo:hi], b), got[lo:hi])
        want = mm(avx512, x, b)
        if avx512.slm_fgemm_pairs(qgemm.FLOAT_DTYPES[dtype]):
            # AVX512-BF16 adds products in pairs: float32 sums of the same exact products in
            # another order, each rounded once to bfloat16 -> within 1 bfloat16 ulp + the sums' error
            scale = (x.double().abs() @ w.double().abs().t()) + (0 if b is None else b.double().abs())
            assert ((got.double() - want.double()).abs() <= 2.0**-7 * want.double().abs() + 1e-5 * scale).all()
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,D,S", [(1, 4, 4, 64, 1), (3, 8, 2, 96, 1), (2, 6, 3, 40, 5), (1, 4, 1, 256, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_same_bits_as_avx512(both, monkeypatch, dtype, B, H, Hkv, D, S, window):
    lens = [S + (7 * b + 3) % 40 for b in range(B)]
    k, v = slot_views(B, Hkv, D, lens, dtype, seed=B * D)
    q = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).transpose(1, 2)
    qpos = torch.tensor(lens)[:, None] - S + torch.arange(S)
    outs = []
    for lib in both:
        monkeypatch.setattr(qgemm, "_lib", lib)
        monkeypatch.setattr(qgemm, "_tried", True)
        outs.append(qgemm.decode_attention(q, k, v, qpos=qpos, window=window, scale=D**-0.5))
    assert outs[0] is not None and outs[1] is not None
    assert torch.equal(outs[0], outs[1])
    # chunk-invariant on its own: the last query alone gives its bits in the chunk
    alone = qgemm.decode_attention(q[:, :, -1:], k, v, qpos=qpos[:, -1:], window=window, scale=D**-0.5)
    assert alone is not None and torch.equal(alone, outs[1][:, :, -1:])
