"""Phi-3's fused decode step (kernels/fused.cpp slm_phi3_decode: every layer of a few tokens in one
call) against the per-op path it replaces: the same greedy tokens and logits, bit for bit, on tiny
random Phi-3s (sliding window, GQA, LongRoPE across its crossover, partial rotary, Phi-4-mini's
shape), quantized int4 / int8, float32 and bfloat16, with both kernel variants. Torch's own ops (the
kernels off) agree within a stated tolerance; the kernel's Llama-style norm and SiLU-gate agree with
torch's within float32 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slmkit
from slmkit.kernels import fused
from slmkit.kernels.qgemm import get_kernel
from slmkit.models.layers import RMSNorm
from slmkit.quant.linear import use_kernel
from tests.helpers.fused_steps import decode, new_cache, spying
from tests.helpers.tiny_models import make_phi4_folder

pytestmark = [pytest.mark.skipif(get_kernel() is None, reason="the fused step is part of the compiled kernels"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)

PROMPT, NEW = 7, 30  # 36 positions: past the sliding window of 8 and the LongRoPE crossover at 32


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setattr(fused, "fused_decode_enabled", True)  # whatever SLMKIT_FUSED_DECODE says


@pytest.fixture(scope="module")
def phi4_mini(tmp_path_factory):
    return make_phi4_folder(tmp_path_factory.mktemp("phi4-mini-fused"), "phi4-mini")


def per_op(monkeypatch, *args) -> tuple[list[int], torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(fused, "fused_decode_enabled", False)
        return decode(*args)


def prompt_of(llm, seed: int = 1, n: int = PROMPT) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, llm.engine.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("variant", ["mha_sliding", "gqa", "longrope", "partial_rotary", "phi4-mini"])
@pytest.mark.parametrize("dtype,quant", [("float32", "int4"), ("bfloat16", "int8")])
def test_fused_step_equals_the_per_op_path_bit_for_bit(phi3_folders, phi4_mini, monkeypatch, variant, dtype,
                                                       quant):
    folder = phi4_mini if variant == "phi4-mini" else phi3_folders(variant)
    llm = slmkit.load(folder, dtype=dtype, quant=quant)
    model, dt, prompt = llm.engine.model, getattr(torch, dtype), prompt_of(llm)
    seen = spying(monkeypatch, "phi3_decode")
    fast = decode(model, prompt, NEW, dt)
    assert seen == [(PROMPT, True)] + [(1, True)] * (NEW - 1)  # the short prefill and every step ran fused
    slow = per_op(monkeypatch, model, prompt, NEW, dt)
    assert len(seen) == NEW
    assert len(set(fast[0])) > 3 and fast[0] == slow[0]
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("variant,dtype,quant", [("longrope", "float32", "int4"), ("mha_sliding", "bfloat16", "int8")])
def test_a_few_tokens_at_once_run_fused_with_one_token_bits(phi3_folders, monkeypatch, variant, dtype, quant):
    """A speculative verification's pass (up to fused.MAX_FUSED_TOKENS new tokens of one row) runs
    fused, every position with the bits one-token steps and the per-op path give."""
    llm = slmkit.load(phi3_folders(variant), dtype=dtype, quant=quant)
    model, dt = llm.engine.model, getattr(torch, dtype)
    tokens = prompt_of(llm, seed=5, n=30)
    sizes = [7, 5, 1, 3, 4, 10]

    def chunks(sizes: list[int]) -> torch.Tensor:
        cache, out, at = new_cache(model, dt), [], 0
        with torch.inference_mode():
            for n in sizes:
                out.append(model(torch.tensor([tokens[at:at + n]]), cache)[0].float())
                at += n
        return torch.cat(out)

    seen = spying(monkeypatch, "phi3_decode")
    many = chunks(sizes)
    assert seen == [(n, True) for n in sizes]
    ones = chunks([1] * len(tokens))
    monkeypatch.setattr(fused, "fused_decode_enabled", False)
    slow = chunks(sizes)
    assert torch.equal(many, ones) and torch.equal(many, slow)
    assert torch.equal(chunks([fused.MAX_FUSED_TOKENS + 1, 13]), slow)  # past the bound: per op, same bits


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_fused_step_close_to_torch_ops(phi3_folders, dtype, tol):
    """The kernels on (fused step, kernel norms and SiLU, quantized kernel) vs off (torch's ops, the
    PyTorch quantized matmul): the logits differ by rounding only (relative to their largest)."""
    llm = slmkit.load(phi3_folders("gqa"), dtype=dtype, quant="int8")
    model, dt, prompt = llm.engine.model, getattr(torch, dtype), prompt_of(llm, seed=2)
    fast = decode(model, prompt, 8, dt)
    with use_kernel(False):
        slow = decode(model, prompt, 8, dt)
    scale = slow[1].abs().max().item()
    assert (fast[1][0] - slow[1][0]).abs().max().item() <= tol * scale
    if dtype == "float32":
        assert fast[0] == slow[0]
        assert (fast[1] - slow[1]).abs().max().item() <= tol * scale


def test_plan_follows_copies_swaps_and_float_weights(phi3_folders, monkeypatch):
    """A deepcopy decodes with its own weights; a swapped linear or norm weight rebuilds the plan;
    float (unquantized) linears decode per op."""
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32", quant="int8")
    model, prompt = llm.engine.model, prompt_of(llm, seed=3)
    want = decode(model, prompt, 8, torch.float32)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.scales.mul_(1.5)
    got = decode(twin, prompt, 8, torch.float32)
    assert not torch.equal(got[1], want[1]) and torch.equal(decode(model, prompt, 8, torch.float32)[1], want[1])
    assert torch.equal(got[1], per_op(monkeypatch, twin, prompt, 8, torch.float32)[1])
    att = model.model.layers[1].self_attn
    att.o_proj = copy.deepcopy(model.model.layers[0].self_attn.o_proj)
    model.model.layers[0].input_layernorm.weight = torch.nn.Parameter(
        model.model.layers[0].input_layernorm.weight * 2)
    swapped = per_op(monkeypatch, model, prompt, 8, torch.float32)
    assert not torch.equal(swapped[1], want[1])
    assert torch.equal(decode(model, prompt, 8, torch.float32)[1], swapped[1])
    plain = slmkit.load(phi3_folders("gqa"), dtype="float32")
    seen = spying(monkeypatch, "phi3_decode")
    assert len(decode(plain.engine.model, prompt, 4, torch.float32)[0]) == 4
    assert seen == [] and plain.engine.model._plan.decided and plain.engine.model._plan.plan is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kernel_norm_and_silu_close_to_torch_and_split_alike(dtype):
    g = torch.Generator().manual_seed(0)
    for n, scale in ((3072, 1.0), (64, 30.0), (37, 1e-3)):
        norm = RMSNorm(n, 1e-5)
        norm.weight.copy_(torch.randn(n, generator=g))
        norm = norm.to(dtype)
        x = (torch.randn(3, 5, n, generator=g) * scale).to(dtype)
        got = norm(x)  # the kernel's
        with use_kernel(False):
            want = norm(x)  # torch's ops
        assert got.dtype == dtype and got.shape == x.shape
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    gu = torch.randn(2, 3, 2 * 300, generator=g).to(dtype) * 4
    got = fused.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    assert got is not None and got.shape == (2, 3, 300)
    torch.testing.assert_close(got, up * F.silu(gate), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    big = (torch.randn(40, 2 * 4000, generator=g) * 4).to(dtype)  # split over threads: the rows' own bits
    assert torch.equal(fused.silu_mul(big), torch.cat([fused.silu_mul(big[i:i + 1]) for i in range(40)]))
    x = (torch.randn(300, 640, generator=g) * 4).to(dtype)
    w = torch.randn(640, generator=g).to(dtype)
    whole = fused.rms_norm(x, w, 1e-6, llama=True)
    assert torch.equal(whole, torch.cat([fused.rms_norm(x[i:i + 1], w, 1e-6, llama=True) for i in range(300)]))
    assert fused.rms_norm(x, w.float() if dtype != torch.float32 else w.bfloat16(), 1e-6, llama=True) is None
    assert fused.silu_mul(torch.randn(2, 7)) is None  # an odd width: no gate | up halves
