"""The int4 / int8 matmul: compiled kernel and PyTorch fallback against a float64 reference."""
from __future__ import annotations

import pytest
import torch

from slmkit.kernels.qgemm import get_kernel, qmatmul_kernel
from slmkit.quant.format import (
    activation_values,
    dequantize_weight,
    from_codes,
    pack_codes,
    qmatmul_reference,
    quantize,
    unpack_codes,
)

# every test twice: the kernel get_kernel() picks and the AVX2 one (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel_variant")

SHAPES = [  # (n, k, group, bits, m): odd K, N off the 16-row tile, every group size, decode and prefill M
    (16, 32, 32, 4, 1), (40, 100, 32, 4, 1), (33, 257, 64, 4, 3), (100, 384, 128, 4, 5), (17, 512, 256, 4, 2),
    (70, 96, 32, 8, 1), (64, 200, 64, 8, 7), (48, 130, 128, 8, 2), (50, 512, 128, 8, 9), (129, 64, 32, 4, 70),
    (1, 33, 32, 8, 1), (8, 3072, 128, 4, 1),
    # 6 and 5 bits (GGUF's Q6_K and Q5_* at their own size): codes from from_codes (quantize makes 4 / 8)
    (16, 32, 16, 6, 1), (40, 100, 16, 6, 1), (33, 257, 64, 6, 3), (129, 64, 32, 6, 70), (17, 512, 256, 6, 2),
    (16, 32, 32, 5, 1), (40, 100, 32, 5, 5), (50, 512, 128, 5, 9), (129, 64, 32, 5, 70), (8, 3072, 256, 5, 1),
]


def exact(x: torch.Tensor, qw) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 product of the int8-rounded activations and the dequantized weight, and its error scale
    (|x_hat| @ |w|.T): float32 accumulation may differ from float64 by a small multiple of eps of it."""
    xh = activation_values(x, qw)[:, : qw.k]
    w = dequantize_weight(qw).double()
    return xh @ w.t(), xh.abs() @ w.abs().t()


def reference_and_kernel_agree(x: torch.Tensor, qw) -> None:
    """The reference within float32 rounding of the float64 product; the kernel equal to it bit for bit."""
    want, scale = exact(x, qw)
    ref = qmatmul_reference(x, qw)
    assert ((ref.double() - want).abs() <= 1e-5 * scale + 1e-6).all()
    lib = get_kernel()
    if lib is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    assert torch.equal(qmatmul_kernel(lib, x, qw, torch.float32), ref)


def weights(n: int, k: int, group: int, bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if bits in (4, 8):
        return quantize(w, bits, group), torch.randn(3, k, generator=g)
    # 5 / 6 bits: symmetric round to nearest with the middle code as zero (as Q5_0 / Q6_K store it)
    half = 1 << (bits - 1)
    ng = -(-k // group)
    wp = torch.nn.functional.pad(w, (0, ng * group - k)).view(n, ng, group)
    s = (wp.abs().amax(-1) / (half - 1)).to(torch.float16)
    u = (torch.round(wp / s.float().clamp_min(1e-12)[..., None]).clamp(-half, half - 1) + half).to(torch.uint8)
    qw = from_codes(u.view(n, -1)[:, :k], s, None, bits=bits, group=group, zero=half, n=n, k=k)
    return qw, torch.randn(3, k, generator=g)


@pytest.mark.parametrize("n,k,group,bits,m", SHAPES)
def test_reference_matmul_equals_float64(n, k, group, bits, m):
    qw, _ = weights(n, k, group, bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    want, scale = exact(x, qw)
    got = qmatmul_reference(x, qw).double()
    assert ((got - want).abs() <= 1e-5 * scale + 1e-7).all()


@pytest.mark.parametrize("n,k,group,bits,m", SHAPES)
@pytest.mark.parametrize("scales", ["float16", "float32", "mins"])
def test_kernel_equals_float64_and_fallback(n, k, group, bits, m, scales):
    lib = get_kernel()
    if lib is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    g = torch.Generator().manual_seed(2)
    u = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    ng = -(-k // group)
    dt = torch.float32 if scales == "float32" else torch.float16
    s = (torch.rand(n, ng, generator=g) * 0.02).to(dt)
    mins = (torch.randn(n, ng, generator=g) * 0.05).to(dt) if scales == "mins" else None
    qw = from_codes(u, s, mins, bits=bits, group=group, zero=0 if mins is not None else 1 << (bits - 1), n=n, k=k)
    x = torch.randn(m, k, generator=g)
    want, scale = exact(x, qw)
    got = qmatmul_kernel(lib, x, qw, torch.float32).double()
    assert ((got - want).abs() <= 1e-5 * scale + 1e-7).all()
    assert torch.equal(got, qmatmul_reference(x, qw).double())  # the same roundings in the same order


def test_kernel_bfloat16_in_and_out_rounds_like_torch():
    lib = get_kernel()
    if lib is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    qw, x = weights(80, 320, 64, 4)
    xb = x.bfloat16()
    y32 = qmatmul_kernel(lib, xb, qw, torch.float32)
    yb = qmatmul_kernel(lib, xb, qw, torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y32.bfloat16())
    # bf16 input means the bf16 values: same as passing them widened to float32
    assert torch.equal(y32, qmatmul_kernel(lib, xb.float(), qw, torch.float32))


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_pack_unpack_round_trip(bits):
    u = torch.randint(0, 1 << bits, (48, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(u, bits), bits), u)


@pytest.mark.parametrize("group", [32, 128])
def test_int8_error_is_within_half_a_step(group):
    w = torch.randn(37, 300) * 0.1
    qw = quantize(w, 8, group)
    err = (dequantize_weight(qw) - w).abs()
    step = qw.scales.float().transpose(1, 2).reshape(-1, qw.scales.shape[1])[:37]
    step = step.repeat_interleave(group, dim=1)[:, :300]
    # half a step, plus the float16 rounding of the scale times the largest code
    assert (err <= step * (0.5 + 127 * 2 ** -11)).all()
    assert err.max() > 0  # it really quantized


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_search_beats_round_to_nearest(group):
    w = torch.randn(64, 512) * 0.1
    w[0, 5] = 2.0  # an outlier: clipping it pays off for the rest of its group
    err = (dequantize_weight(quantize(w, 4, group)) - w).square().view(64, -1, group).sum(-1)
    g = w.view(64, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    rtn = (((g - lo) / s).round().clamp(0, 15) * s + lo - g).square().sum(-1)
    assert (err <= rtn * 1.01 + 1e-6).all()  # never (meaningfully) worse, group by group
    assert err.sum() < 0.9 * rtn.sum()


def test_zero_rows_and_groups_give_zero_output():
    w = torch.zeros(20, 64)
    w[3, :32] = 1.0
    for bits in (4, 8):
        qw = quantize(w, bits, 32)
        y = qmatmul_reference(torch.ones(1, 64), qw)
        assert torch.allclose(y[0], w.sum(dim=1), atol=1e-2)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_kernel_runs_gguf_blocks_like_the_reference(type_name, m):
    """Every scale kind: float16, float32-free two-level (uint8 / int8 x float32 per 256)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    shape = (40, 512)
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(3)))
                           .reshape(-1).copy())
    qw = repack(raw, int(Q[type_name]), shape)
    reference_and_kernel_agree(torch.randn(m, shape[1], generator=torch.Generator().manual_seed(4)), qw)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("m", [1, 2, 9])
def test_extreme_codes_and_activations_do_not_saturate(bits, sign, m):
    """Every code at its largest (or 0) and every activation at +-127 (a constant row): the largest
    integer sums any path forms (the AVX2 kernel adds vpmaddubsw's int16 pair sums a few at a time,
    and runs int8 codes as |u - 128| with the activation's sign), exactly as the reference does."""
    n, k, group = 48, 512, 256
    u = extreme_codes(n, k, bits)  # the most negative codes too (zero below)
    s = torch.full((n, k // group), 0.01, dtype=torch.float16)
    qw = from_codes(u, s, None, bits=bits, group=group, zero=1 << (bits - 1), n=n, k=k)
    kernel_exact_on_a_constant_row(qw, m, sign)


def extreme_codes(n: int, k: int, bits: int) -> torch.Tensor:
    """[n, k] codes at their largest, every third row at 0."""
    u = torch.full((n, k), (1 << bits) - 1, dtype=torch.uint8)
    u[1::3] = 0
    return u


def kernel_exact_on_a_constant_row(qw, m: int, sign: int) -> None:
    """Every activation at +-127 (m constant rows): the kernel equals the reference bit for bit and the
    float64 product to float32 rounding."""
    lib = get_kernel()
    if lib is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    x = torch.full((m, qw.k), 0.5 * sign)
    got = qmatmul_kernel(lib, x, qw, torch.float32)
    assert torch.equal(got, qmatmul_reference(x, qw))
    want, _ = exact(x, qw)
    assert torch.allclose(got.double(), want, rtol=1e-6)


def _two_level(u: torch.Tensor, sub: torch.Tensor, mins: torch.Tensor | None, *, bits: int, group: int, zero: int,
               per_super: int, dtype: torch.dtype = torch.uint8, super_dtype: torch.dtype = torch.float32):
    """A two-level weight from row-major codes [n, k] and integer sub-scales / sub-mins [n, groups],
    its super-scales in super_dtype (float16: as GGUF's K-quants keep them)."""
    from dataclasses import replace

    from slmkit.quant.format import _tile_groups

    n, k = u.shape
    qw = from_codes(u, sub.to(dtype), None if mins is None else mins.to(torch.uint8), bits=bits, group=group,
                    zero=zero, n=n, k=k)
    supers = k // group // per_super
    np_ = -(-n // 16) * 16
    ss = torch.linspace(1e-3, 3e-3, np_ * supers).view(np_, supers).to(super_dtype)
    sm = None if mins is None else -torch.linspace(2e-3, 1e-3, np_ * supers).view(np_, supers).to(super_dtype)
    return replace(qw, super_scales=_tile_groups(ss), super_mins=None if sm is None else _tile_groups(sm))


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("m", [1, 2, 9])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("super_dtype", [torch.float32, torch.float16])
def test_two_level_integer_sums_do_not_overflow(bits, sign, m, group, super_dtype):
    """Two-level scales sum sub_scale x group sum over a whole super-block of 256 inputs in int32:
    with every code, sub-scale (255) and sub-min at its largest and every activation at +-127 the
    sums come within 2% of 2**31 at 8 bits (4% at 5 and 6 bits, with their activation shifts), and the
    kernel still equals the (float64) reference. Groups of 32 keep every group's activation sum within
    int16 (the AVX2 kernel then takes the mins two groups a vpmaddwd); groups of 64 do not."""
    n, k = 48, 512
    sub = torch.full((n, k // group), 255)
    qw = _two_level(extreme_codes(n, k, bits), sub, sub.clone(), bits=bits, group=group, zero=0,
                    per_super=256 // group, super_dtype=super_dtype)
    assert qw.scale_kind == (14 if super_dtype == torch.float16 else 6) and qw.activation_group == 256
    kernel_exact_on_a_constant_row(qw, m, sign)


def test_two_level_scales_and_mins_are_paired_whatever_the_source():
    """A two-level weight built from four separate tensors keeps them paired (one record per group,
    one per super-block: views of two buffers), with the same values; the kernel refuses a paired
    kind whose mins do not sit beside the scales."""
    from slmkit.kernels.qgemm import qgemm_weight_args

    g = torch.Generator().manual_seed(5)
    n, k = 40, 512
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    sub, mn = torch.randint(0, 64, (n, 16), generator=g), torch.randint(0, 64, (n, 16), generator=g)
    qw = _two_level(u, sub, mn, bits=4, group=32, zero=0, per_super=8)
    assert qw.paired and qw.scale_kind == 6
    assert qw.mins.untyped_storage().data_ptr() == qw.scales.untyped_storage().data_ptr()
    assert qw.super_mins.untyped_storage().data_ptr() == qw.super_scales.untyped_storage().data_ptr()
    from slmkit.quant.format import _untile_groups

    assert torch.equal(_untile_groups(qw.scales)[:n], sub.to(torch.uint8))
    assert torch.equal(_untile_groups(qw.mins)[:n], mn.to(torch.uint8))
    plain = _two_level(u, sub, None, bits=4, group=32, zero=0, per_super=8, dtype=torch.int8)
    assert not plain.paired and plain.scale_kind == 3 and plain.scales.is_contiguous()
    x = torch.randn(3, k, generator=g)
    reference_and_kernel_agree(x, qw)
    lib = get_kernel()
    args = list(qgemm_weight_args(qw))
    separate = qw.mins.contiguous()
    args[4] = separate.data_ptr()  # paired kind, mins elsewhere: refused, never misread
    out = torch.empty(3, n)
    xc = x.contiguous()
    rc = lib.slm_qgemm(xc.data_ptr(), 0, 3, *args, out.data_ptr(), 0, n, 1)
    assert rc == -1


@pytest.mark.parametrize("mins", [True, False])
def test_float16_super_scales_match_float32_ones_and_bad_kinds_are_refused(mins):
    """The same two-level weight with float16 super-scales (GGUF's K-quants) and with those values
    in float32: the kernel gives the same bits from both, and the reference agrees; the kernel refuses
    the float16 bit on a one-level kind, and a paired float16 kind whose super-mins lie a float32
    record's width away (so float32 supers are never read as float16)."""
    from dataclasses import replace

    from slmkit.kernels.qgemm import qgemm_weight_args

    g = torch.Generator().manual_seed(9)
    n, k = 40, 768
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    sub, mn = torch.randint(0, 64, (n, k // 32), generator=g), torch.randint(0, 64, (n, k // 32), generator=g)
    half = _two_level(u, sub, mn if mins else None, bits=4, group=32, zero=0 if mins else 8, per_super=8,
                      super_dtype=torch.float16)
    full = replace(half, super_scales=half.super_scales.float(),
                   super_mins=None if half.super_mins is None else half.super_mins.float())
    assert half.super_scales.dtype == torch.float16 and full.super_scales.dtype == torch.float32
    assert half.scale_kind == full.scale_kind + 8 and half.paired == full.paired == mins
    x = torch.randn(5, k, generator=g)
    reference_and_kernel_agree(x, half)
    lib = get_kernel()
    if lib is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    assert torch.equal(qmatmul_kernel(lib, x, half, torch.float32), qmatmul_kernel(lib, x, full, torch.float32))
    out, xc = torch.empty(5, n), x.contiguous()
    args = list(qgemm_weight_args(full))
    if mins:  # paired float32 supers called float16: the super-mins' distance gives it away
        args[5] = full.scale_kind | 8
        assert lib.slm_qgemm(xc.data_ptr(), 0, 5, *args, out.data_ptr(), 0, n, 1) == -1
    args[5] = 9  # the float16 bit on one-level (float16) scales
    assert lib.slm_qgemm(xc.data_ptr(), 0, 5, *args, out.data_ptr(), 0, n, 1) == -1


def test_two_level_super_blocks_over_256_inputs_are_refused():
    """A super-scale over more than 256 inputs would let the kernel's int32 sums overflow: a clear
    ValueError at construction, naming the numbers."""
    u = torch.zeros(16, 1024, dtype=torch.uint8)
    sub = torch.ones(16, 16)
    with pytest.raises(ValueError, match="512 inputs per super-scale"):
        _two_level(u, sub, sub.clone(), bits=4, group=64, zero=0, per_super=8)
