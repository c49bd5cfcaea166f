"""The compiled attention (one or more queries per row) against SDPA with the mask, in float64, and
against itself: a query's result is the same bits in a decode step, a batch, or a prefill chunk."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit.kernels import qgemm as kernel
from slmkit.kernels.qgemm import decode_attention, get_kernel
from slmkit.models.cache import Aligned, Ragged
from slmkit.models.layers import attention

pytestmark = [pytest.mark.skipif(get_kernel() is None, reason="the compiled kernel is unavailable on this machine"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)


def reference(q, k, v, qpos, window, scale):
    """float64 SDPA over the visible keys of each row: j <= qpos and j > qpos - window."""
    L = k.shape[2]
    kpos = torch.arange(L)
    mask = kpos <= qpos[:, :, None]
    if window is not None:
        mask = mask & (kpos > qpos[:, :, None] - window)
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask[:, None], scale=scale)


def slot_views(B, Hkv, D, lens, dtype, slots=11, cap=None, seed=0):
    """k, v: views [:B, :, :max(lens)] of a bigger [slots, Hkv, cap, D] slot cache, like SlotCache's."""
    g = torch.Generator().manual_seed(seed)
    L = max(lens)
    cap = cap or L + 7
    kc = torch.randn(slots, Hkv, cap, D, generator=g).to(dtype)
    vc = torch.randn(slots, Hkv, cap, D, generator=g).to(dtype)
    return kc[:B, :, :L], vc[:B, :, :L]


CASES = [  # (B, H, Hkv, D)
    (1, 4, 4, 64), (2, 8, 4, 96), (3, 8, 2, 128), (5, 4, 1, 256), (8, 32, 32, 96), (9, 4, 2, 64), (4, 6, 3, 16),
]


@pytest.mark.parametrize("B,H,Hkv,D", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 5, 1000])
def test_kernel_equals_float64_sdpa(B, H, Hkv, D, dtype, window):
    lens = [1 + (7 * b + 3) % 40 for b in range(B)]
    lens[0] = 1  # one key
    k, v = slot_views(B, Hkv, D, lens, dtype, seed=B * D)
    assert not k.is_contiguous() or B == 1
    q = torch.randn(B, 1, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).transpose(1, 2)
    qpos = torch.tensor(lens)[:, None] - 1
    scale = D**-0.5
    got = decode_attention(q, k, v, qpos=qpos, window=window, scale=scale)
    assert got is not None and got.shape == (B, H, 1, D) and got.dtype == dtype
    want = reference(q, k, v, qpos, window, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
    else:  # the float32 result, rounded once to the output dtype
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert ((got.double() - want).abs() <= ulp * want.abs() + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_path_sees_every_key_or_the_window(dtype):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, 30, 64, generator=g).to(dtype) for _ in range(2))
    for window in (None, 7, 30, 31):
        got = decode_attention(q, k, v, qpos=None, window=window, scale=0.3)
        want = reference(q, k, v, torch.full((3, 1), 29), window, 0.3)
        tol = 2e-6 if dtype == torch.float32 else 2.0**-8
        assert ((got.double() - want).abs() <= tol * want.abs() + 1e-5).all()


def test_attention_routes_decode_to_the_kernel_and_matches_sdpa(monkeypatch):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(4, 8, 1, 32, generator=g)
    kc, vc = torch.randn(6, 4, 20, 32, generator=g), torch.randn(6, 4, 20, 32, generator=g)
    k, v = kc[:4, :, :12], vc[:4, :, :12]
    qpos = torch.tensor([[3], [11], [0], [7]])
    for window in (None, 4):
        on = attention(q, k, v, Ragged(qpos), window=window, scale=0.2)
        single = attention(q[:1], k[:1, :, :4], v[:1, :, :4], Aligned(3, torch.tensor([[3]])), window=window, scale=0.2)
        monkeypatch.setattr(kernel, "decode_attention_enabled", False)
        off = attention(q, k, v, Ragged(qpos), window=window, scale=0.2)
        single_off = attention(q[:1], k[:1, :, :4], v[:1, :, :4], Aligned(3, torch.tensor([[3]])),
                               window=window, scale=0.2)
        monkeypatch.setattr(kernel, "decode_attention_enabled", True)
        torch.testing.assert_close(on, off, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single, single_off, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single, on[:1])


def test_unsupported_inputs_fall_back():
    q = torch.randn(2, 4, 1, 32)
    k = v = torch.randn(2, 4, 9, 32)
    assert decode_attention(q.double(), k.double(), v.double(), qpos=None, window=None, scale=1.0) is None
    assert decode_attention(q, k.bfloat16(), v, qpos=None, window=None, scale=1.0) is None  # mixed dtypes
    strided = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert decode_attention(q, strided, v, qpos=None, window=None, scale=1.0) is None
    assert decode_attention(torch.randn(2, 4, 10, 32), k, v, qpos=None, window=None, scale=1.0) is None  # S > L
    assert decode_attention(q, k, v, qpos=torch.tensor([[3], [9]]), window=None, scale=1.0) is None  # qpos >= L


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_a_prefill_chunk_gives_each_query_the_bits_of_its_decode_step(dtype, window):
    """S queries at positions offset..offset+S-1 in one call (a prefill chunk, or a whole prompt),
    each equal bit for bit to that query alone over the keys up to its position (a decode step),
    to the same query as a row of a batch at other lengths, and close to float64 SDPA."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, D, L = 2, 8, 2, 64, 23
    kc, vc = (torch.randn(5, Hkv, 40, D, generator=g).to(dtype) for _ in range(2))
    k, v = kc[:B, :, :L], vc[:B, :, :L]
    for S in (1, 2, 7, L):
        q = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)  # [B, H, S, D], as the models give
        got = decode_attention(q, k, v, qpos=None, window=window, scale=0.125)
        assert got.shape == (B, H, S, D)
        for s in range(S):
            p = L - S + s
            alone = decode_attention(q[:, :, s:s + 1], k[:, :, :p + 1], v[:, :, :p + 1], qpos=None, window=window,
                                     scale=0.125)
            assert torch.equal(got[:, :, s:s + 1], alone)
            # as row 1 of a batch whose row 0 is longer
            rows = torch.tensor([[L - 1], [p]])
            q2 = torch.stack([q[0, :, s], q[1, :, s]])[:, :, None]
            batched = decode_attention(q2, k, v, qpos=rows, window=window, scale=0.125)
            assert torch.equal(batched[1:], alone[1:])
        want = reference(q, k, v, torch.arange(L - S, L).expand(B, S), window, 0.125)
        tol = 2e-6 if dtype == torch.float32 else 2.0**-8
        assert ((got.double() - want).abs() <= tol * want.abs() + 1e-5).all()


def test_attention_routes_prefill_chunks_to_the_kernel(monkeypatch):
    calls = []
    real = kernel.decode_attention

    def counting(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 5, 32, generator=g)
    k, v = torch.randn(1, 2, 12, 32, generator=g), torch.randn(1, 2, 12, 32, generator=g)
    import slmkit.models.layers as layers

    monkeypatch.setattr(layers, "decode_attention", counting)
    out = attention(q, k, v, Aligned(7, torch.arange(7, 12)[None]), window=None, scale=0.2)  # 5 after 7 cached
    whole = attention(q, k[:, :, :5], v[:, :, :5], Aligned(0, torch.arange(5)[None]), window=3, scale=0.2)  # no cache
    assert calls == [True, True]
    ref = reference(q, k, v, torch.arange(7, 12)[None], None, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(whole.double(), reference(q, k[:, :, :5], v[:, :, :5], torch.arange(5)[None], 3, 0.2),
                               atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [40, 96, 256])
@pytest.mark.parametrize("window", [None, 4, 9])
def test_queries_taken_together_keep_their_own_bits(dtype, D, window):
    """The kernel takes up to 4 queries of a row at once (each key read once for all of them): with
    positions in any order, repeated, or far apart, and windows that start them at other keys, each
    query's result is the bits it has alone."""
    g = torch.Generator().manual_seed(D)
    B, H, Hkv, L = 2, 8, 2, 30
    kc, vc = (torch.randn(4, Hkv, L + 3, D, generator=g).to(dtype) for _ in range(2))
    k, v = kc[:B, :, :L], vc[:B, :, :L]
    qpos = torch.tensor([[3, 4, 5, 6, 7, 20, 21, 29, 0, 1, 2],
                         [29, 28, 12, 12, 13, 5, 6, 7, 8, 25, 26]])
    S = qpos.shape[1]
    q = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    got = decode_attention(q, k, v, qpos=qpos, window=window, scale=D**-0.5)
    assert got is not None and got.shape == (B, H, S, D)
    for b in range(B):
        for s in range(S):
            alone = decode_attention(q[b:b + 1, :, s:s + 1], k[b:b + 1], v[b:b + 1], qpos=qpos[b:b + 1, s:s + 1],
                                     window=window, scale=D**-0.5)
            assert torch.equal(got[b:b + 1, :, s:s + 1], alone), (b, s)
    want = reference(q, k, v, qpos, window, D**-0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
    else:
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert ((got.double() - want).abs() <= ulp * want.abs() + 1e-5).all()
