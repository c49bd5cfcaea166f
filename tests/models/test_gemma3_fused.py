"""Gemma 3's fused decode step (kernels/fused.cpp: every layer of one token in one call) against the
per-op path it replaces: the same greedy tokens and the same logits, bit for bit, on a tiny random
Gemma 3 (GQA, sliding and global layers, decode past the window), quantized int4 / int8, float32 and
bfloat16, with both kernel variants. Torch's own ops (the kernels switched off) agree within a
stated tolerance; the kernel's norm and GeGLU agree with torch's within float32 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slmkit
from slmkit.kernels import fused
from slmkit.kernels.qgemm import get_kernel
from slmkit.models import gemma3
from slmkit.models.layers import RMSNorm
from slmkit.quant.linear import use_kernel
from tests.helpers.fused_steps import decode, new_cache, spying
from tests.helpers.tiny_models import make_gemma3_folder

pytestmark = [pytest.mark.skipif(get_kernel() is None, reason="the fused step is part of the compiled kernels"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)

PROMPT, NEW = 7, 24  # 31 positions: past the sliding window of 8


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setattr(fused, "fused_decode_enabled", True)  # whatever SLMKIT_FUSED_DECODE says


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("g3-fused"))


def prompt_of(llm, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, llm.engine.vocab_size, (PROMPT,), generator=g).tolist()


def ones(seen: list[tuple[int, bool]]) -> list[bool]:
    """What each one-token call of the fused step did (True: it ran); a short prompt's prefill (up to
    fused.MAX_FUSED_TOKENS tokens) runs fused too, left out."""
    return [ran for n, ran in seen if n == 1]


@pytest.mark.parametrize("dtype,quant", [("float32", "int4"), ("bfloat16", "int4"), ("float32", "int8"),
                                         ("bfloat16", "int8")])
def test_fused_step_equals_the_per_op_path_bit_for_bit(folder, monkeypatch, dtype, quant):
    llm = slmkit.load(folder, dtype=dtype, quant=quant)
    model, dt, prompt = llm.engine.model, getattr(torch, dtype), prompt_of(llm)
    if quant == "int4":  # rotary rows from tables of 5 positions: several refills in one run
        monkeypatch.setattr(gemma3, "ROPE_BLOCK", 5)
    calls = spying(monkeypatch, "gemma3_decode")
    fast = decode(model, prompt, NEW, dt)
    assert ones(calls) == [True] * (NEW - 1)  # every one-token step ran fused
    monkeypatch.setattr(fused, "fused_decode_enabled", False)
    slow = decode(model, prompt, NEW, dt)
    assert len(ones(calls)) == NEW - 1  # ... and now none did
    assert len(set(fast[0])) > 3 and fast[0] == slow[0]
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_fused_equals_per_op(folder, tmp_path, monkeypatch, qtype):
    """A GGUF file's blocks kept at their own bits (5-bit codes, 4-bit with mins, 8-bit), as the
    built-in model runs them: the fused step gives the per-op path's tokens and logits."""
    from slmkit.gguf import open_gguf
    from tests.helpers.gguf_models import hf_to_gguf

    path = hf_to_gguf(folder, tmp_path / f"g3-{qtype}.gguf", qtype)
    assert qtype in {i.type_name for i in open_gguf(path).tensors.values()}
    llm = slmkit.load(path)
    model, dt, prompt = llm.engine.model, llm.engine.dtype, prompt_of(llm, seed=4)
    calls = spying(monkeypatch, "gemma3_decode")
    fast = decode(model, prompt, 12, dt)
    assert ones(calls) == [True] * 11
    slow = per_op(monkeypatch, model, prompt, 12, dt)
    assert fast[0] == slow[0] and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_fused_step_close_to_torch_ops(folder, dtype, tol):
    """The kernels on (fused step, kernel norms, quantized kernel) vs off (torch's norms and GELU, the
    PyTorch quantized matmul): the same weights, so the logits differ by rounding only (relative to
    their largest magnitude: 1e-3 float32, 0.15 bfloat16, whose rounding the two paths do differently
    in the matmul's activations)."""
    llm = slmkit.load(folder, dtype=dtype, quant="int8")
    model, dt, prompt = llm.engine.model, getattr(torch, dtype), prompt_of(llm, seed=2)
    fast = decode(model, prompt, 8, dt)
    with use_kernel(False):
        slow = decode(model, prompt, 8, dt)
    scale = slow[1].abs().max().item()
    assert (fast[1][0] - slow[1][0]).abs().max().item() <= tol * scale  # the same prompt: same first logits
    if dtype == "float32":
        assert fast[0] == slow[0]
        assert (fast[1] - slow[1]).abs().max().item() <= tol * scale


def per_op(monkeypatch, *args) -> tuple[list[int], torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(fused, "fused_decode_enabled", False)
        return decode(*args)


def test_plan_follows_copies_and_swapped_weights(folder, monkeypatch):
    """A deepcopy decodes with its own weights; a linear swapped for another rebuilds the plan."""
    llm = slmkit.load(folder, dtype="float32", quant="int8")
    model, prompt = llm.engine.model, prompt_of(llm, seed=3)
    want = decode(model, prompt, 10, torch.float32)
    twin = copy.deepcopy(model)
    first = twin.model.layers[0]
    with torch.no_grad():
        for n in (first.input_layernorm, first.mlp.down_proj):  # the copy's weights, not the original's
            buf = n.weight if isinstance(n, RMSNorm) else n.scales
            buf.mul_(1.5)
    got = decode(twin, prompt, 10, torch.float32)
    assert not torch.equal(got[1], want[1])
    before = decode(model, prompt, 10, torch.float32)
    assert before[1].equal(want[1])  # the original is untouched
    assert torch.equal(got[1], per_op(monkeypatch, twin, prompt, 10, torch.float32)[1])
    att = model.model.layers[1].self_attn
    att.v_proj = copy.deepcopy(model.model.layers[0].self_attn.v_proj)  # another module, other weights
    want = per_op(monkeypatch, model, prompt, 10, torch.float32)
    assert not torch.equal(want[1], before[1])
    assert torch.equal(decode(model, prompt, 10, torch.float32)[1], want[1])
    att.o_proj.scales = att.o_proj.scales * 0.5  # a buffer replaced
    want = per_op(monkeypatch, model, prompt, 10, torch.float32)
    assert torch.equal(decode(model, prompt, 10, torch.float32)[1], want[1])
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight * 2)  # the final norm's weight
    want = per_op(monkeypatch, model, prompt, 10, torch.float32)
    assert torch.equal(decode(model, prompt, 10, torch.float32)[1], want[1])


def test_float_weights_decode_per_op(folder, monkeypatch):
    """Float (unquantized) linears have no fused step: the plan says so once; decoding still works."""
    llm = slmkit.load(folder, dtype="float32")
    calls = spying(monkeypatch, "gemma3_decode")
    tokens, _ = decode(llm.engine.model, prompt_of(llm), 5, torch.float32)
    assert len(tokens) == 5 and calls == []
    assert llm.engine.model._plan.decided and llm.engine.model._plan.plan is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kernel_norm_and_geglu_close_to_torch(dtype):
    g = torch.Generator().manual_seed(0)
    for n, offset, scale in ((640, 0.0, 1.0), (256, 1.0, 30.0), (37, 1.0, 1e-3)):
        norm = RMSNorm(n, 1e-6, offset=offset, fp32_weight=True)
        norm.weight.copy_(torch.randn(n, generator=g))
        x = (torch.randn(3, 5, n, generator=g) * scale).to(dtype)
        res = torch.randn(3, 5, n, generator=g).to(dtype)
        want = norm(x)  # torch's ops
        got = fused.rms_norm(x, norm.weight, norm.eps, norm.offset)
        added = fused.rms_norm(x, norm.weight, norm.eps, norm.offset, residual=res)
        assert got is not None and added is not None and got.dtype == dtype and got.shape == x.shape
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
        assert torch.equal(added, res + got)  # the residual add rounds as `res + norm(x)` does
    gate, up = torch.randn(2, 300, generator=g).to(dtype) * 3, torch.randn(2, 300, generator=g).to(dtype)
    got = fused.geglu(gate, up)
    assert got is not None
    want = F.gelu(gate, approximate="tanh") * up
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_kernel_ops_step_aside_where_they_cannot_run():
    x = torch.randn(2, 8)
    w = torch.randn(8)
    assert fused.rms_norm(x.half(), w, 1e-6, 0.0) is None  # float16: torch's ops
    assert fused.rms_norm(x, torch.randn(7), 1e-6, 0.0) is None  # a weight of the wrong size
    assert fused.rms_norm(x, w.requires_grad_(), 1e-6, 0.0) is None  # autograd
    assert fused.geglu(x, torch.randn(2, 7)) is None
    with use_kernel(False):
        assert fused.rms_norm(x, w.detach(), 1e-6, 0.0) is None and fused.kernel_lib() is None


def test_kernel_argmax_is_torchs():
    """The greedy draw's argmax: the first largest, as torch's (ties, -inf entries, a strided
    batch); None for what sampling.finite_choice must see (NaN, +inf, a row of -inf)."""
    g = torch.Generator().manual_seed(0)
    for v in (1, 15, 16, 17, 1000, 262144):
        x = torch.randn(4, v, generator=g)
        x[1, v // 3] = x[1, v // 2] = x[1].max() + 1  # a tie: the first one
        x[2, : v // 2 + 1] = float("-inf")
        x[2, -1] = 0.5
        x[3, -1] = x[3].max() + 1  # the tail after the 16-wide blocks
        assert torch.equal(fused.argmax(x), x.argmax(-1))
        assert torch.equal(fused.argmax(x[::2]), x[::2].argmax(-1))
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[1, v - 1] = bad
            assert fused.argmax(y) is None
        assert fused.argmax(torch.full((1, v), float("-inf"))) is None
    assert fused.argmax(torch.randn(2, 8).double()) is None and fused.argmax(torch.randn(3, 8)[:, ::2]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kernel_ops_split_over_threads_give_the_same_bits(dtype):
    """A prefill's norm and GeGLU (many rows, split over threads) equal the same rows one at a time."""
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(300, 640, generator=g) * 4).to(dtype), torch.randn(300, 640, generator=g).to(dtype)
    w = torch.randn(640, generator=g)
    whole = fused.rms_norm(x, w, 1e-6, 1.0, residual=res)
    rows = torch.cat([fused.rms_norm(x[i:i + 1], w, 1e-6, 1.0, residual=res[i:i + 1]) for i in range(300)])
    assert torch.equal(whole, rows)
    gate, up = (torch.randn(2, 70001, generator=g) * 3).to(dtype), torch.randn(2, 70001, generator=g).to(dtype)
    whole = fused.geglu(gate, up)
    parts = torch.cat([fused.geglu(gate[:, i:i + 999], up[:, i:i + 999]) for i in range(0, 70001, 999)], dim=1)
    assert torch.equal(whole, parts)


def chunks(model, tokens: list[int], sizes: list[int], dtype: torch.dtype) -> torch.Tensor:
    """tokens fed in chunks of these sizes through model.forward; the logits of every position."""
    cache = new_cache(model, dtype)
    out, at = [], 0
    with torch.inference_mode():
        for n in sizes:
            out.append(model(torch.tensor([tokens[at:at + n]]), cache)[0].float())
            at += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype,quant", [("float32", "int4"), ("bfloat16", "int8")])
def test_a_few_tokens_at_once_run_fused_with_one_token_bits(folder, monkeypatch, dtype, quant):
    """A speculative verification's pass (the pending token and its drafts: up to
    fused.MAX_FUSED_TOKENS new tokens of one row) runs fused, and every position's logits are the
    bits one-token steps (fused) and the per-op path give, across the sliding window."""
    llm = slmkit.load(folder, dtype=dtype, quant=quant)
    model, dt = llm.engine.model, getattr(torch, dtype)
    tokens = prompt_of(llm, seed=5) + prompt_of(llm, seed=6) + prompt_of(llm, seed=7)[:6]  # 20 positions
    sizes = [7, 5, 1, 3, 4]
    seen = spying(monkeypatch, "gemma3_decode")
    many = chunks(model, tokens, sizes, dt)
    assert seen == [(n, True) for n in sizes]
    ones = chunks(model, tokens, [1] * len(tokens), dt)
    monkeypatch.setattr(fused, "fused_decode_enabled", False)
    slow = chunks(model, tokens, sizes, dt)
    assert torch.equal(many, ones) and torch.equal(many, slow)
    big = chunks(model, tokens, [fused.MAX_FUSED_TOKENS + 1, 3], dt)  # past the bound: per op, same bits
    assert torch.equal(big, slow)
