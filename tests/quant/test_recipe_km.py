"""int4-km (quant/recipe.py, calibrate.py, equalize.py): which linears stay int8, the calibrated fit
(its output error on inputs of the calibrated power), the equalization folded into a norm (same
function; undone where it would not be), bits per weight, kernel = fallback, and the `slm quantize`
folder round trip."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slmkit
from slmkit.cli import main
from slmkit.kernels.qgemm import get_kernel
from slmkit.quant.calibrate import CALIBRATION_FILE, calibration_ids, importance, input_power
from slmkit.quant.format import dequantize_weight
from slmkit.quant.linear import QuantLinear, apply_quant, check_scheme, use_kernel
from slmkit.quant.recipe import bits_per_weight, km_int8_names, more_bits, quantize_mixed
from tests.quant.test_recipe import synthetic

PROMPT = list(range(5, 25))


def test_more_bits_layers_follow_llama_cpp():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2 (integer division)
    assert [i for i in range(18) if more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
    assert sum(more_bits(i, 32) for i in range(32)) == 16 and [i for i in range(3) if more_bits(i, 3)] == [2]
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    names = [f"model.layers.{i}.{p}" for i in range(8) for p in parts]
    int8 = km_int8_names([*names, "lm_head"])
    assert "lm_head" in int8 and all(f"model.layers.{i}.self_attn.v_proj" in int8 for i in range(8))
    downs = sorted(n for n in int8 if n.endswith("down_proj"))
    assert downs == [f"model.layers.{i}.mlp.down_proj" for i in (0, 3, 6, 7)]
    assert not any(n.endswith(("q_proj", "k_proj")) for n in int8)


def test_weighted_fit_lowers_the_output_error_on_inputs_of_that_power():
    w = synthetic(64, 640, seed=3)
    g = torch.Generator().manual_seed(1)
    power = torch.exp(torch.randn(640, generator=g) * 1.5)  # uneven input channels, as real activations
    power[::97] *= 200  # and a few outlier channels
    imp = importance(power)
    assert imp is not None and imp.mean().item() == pytest.approx(1.0, rel=0.05) and imp.min() >= 0.01 - 1e-7

    def output_error(qw) -> float:  # E ||(W - Q) x||^2 for x with independent inputs of variance `power`
        return ((dequantize_weight(qw) - w).square() * power).sum().item()

    plain, fitted = quantize_mixed(w, 32), quantize_mixed(w, 32, weights=imp)
    assert output_error(fitted) < 0.9 * output_error(plain)
    # what it gives up: plain squared error (the unweighted fit minimises that)
    assert (dequantize_weight(plain) - w).square().sum() < (dequantize_weight(fitted) - w).square().sum()
    assert torch.equal(quantize_mixed(w, 32, weights=torch.ones(640)).qweight, plain.qweight)  # uniform = None
    with pytest.raises(ValueError, match="640 inputs"):
        quantize_mixed(w, 32, weights=torch.ones(64))
    assert importance(torch.zeros(640)) is None and importance(torch.full((640,), float("nan"))) is None


class _EmbedLinear(nn.Module):
    """The models' forward signature (ids [1, S], last_only) over an embedding and two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        h = self.proj(self.embed(ids))
        return self.head(h[:, -1:] if last_only else h)


def test_input_power_is_the_mean_square_of_each_input():
    torch.manual_seed(0)
    model = _EmbedLinear()
    ids = [3, 7, 7, 11, 42]
    power = input_power(model, ids, ["proj", "head", "embed"])
    assert set(power) == {"proj", "head"}  # linears only
    x = model.embed.weight[ids].detach()
    torch.testing.assert_close(power["proj"], x.square().mean(0))
    # head reads only the last position (last_only): its statistic is over the row it saw
    last = model.proj(x[-1:]).detach()
    torch.testing.assert_close(power["head"], last.square()[0])
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_int4_km_model_calibrates_keeps_int8_and_counts_bits(phi3_folders):
    folder = phi3_folders("gqa")
    llm = slmkit.load(folder, dtype="float32", quant="int4-km")
    model = llm.engine.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    n_layers = llm.engine.args.num_hidden_layers
    assert {n for n, m in layers.items() if m.bits == 8} == km_int8_names(list(layers))
    assert layers["lm_head"].bits == 8 and layers[f"model.layers.{n_layers - 1}.mlp.down_proj"].bits == 8
    assert layers["model.layers.0.mlp.down_proj"].super_scales is not None  # int4-k elsewhere
    # bits: every quantized linear but lm_head, stored bytes (codes, scales, mins, super-scales) counted
    stored = sum(m.weight_q.nbytes * 8 for n, m in layers.items() if n != "lm_head")
    weights = sum(m.in_features * m.out_features for n, m in layers.items() if n != "lm_head")
    assert bits_per_weight(model) == pytest.approx(stored / weights)
    assert 4.75 < bits_per_weight(model) < 8.5
    # the fit used the calibration text: the same float model quantized without it differs
    uncal = slmkit.load(folder, dtype="float32", pack=False)  # plain nn.Linear weights to quantize
    apply_quant(uncal.engine.model, "int4-km")  # no tokenizer: an unweighted fit
    other = dict(uncal.engine.model.named_modules())
    assert torch.equal(other["lm_head"].qweight, layers["lm_head"].qweight)  # int8: no fit involved
    assert any(not torch.equal(other[n].scales, m.scales) for n, m in layers.items() if m.bits == 4)
    ref = slmkit.load(folder, dtype="float32")
    a, b = ref.logits(PROMPT), llm.logits(PROMPT)
    assert 1e-4 < ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item() < 0.7  # tiny random model: loose
    assert check_scheme("int4-km", None) == (4, 32)
    assert len(calibration_ids(llm.tokenizer)) > 100 and CALIBRATION_FILE.is_file()


def test_int4_km_kernel_equals_fallback(phi3_folders):
    if get_kernel() is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    """Every quantized linear of an int4-km model, fed what it saw in a forward pass, gives the same
    bits through the kernel as through the PyTorch fallback. (Whole-model logits are not compared:
    the norms' own float rounding differs between the two paths, and int8 activations turn a 1e-7
    difference into a different code now and then.)"""
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32", quant="int4-km")
    seen: list[tuple[QuantLinear, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, i[0].detach().clone(), o.detach().clone())))
             for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    with use_kernel(True):
        llm.logits(PROMPT)
    for h in hooks:
        h.remove()
    assert len(seen) >= len(hooks) and any(mod.super_scales is not None for mod, _, _ in seen)
    with use_kernel(False):
        for mod, x, y in seen:
            assert torch.equal(mod(x), y)


def test_quantize_cli_int4_km_folder_round_trip(phi3_folders, tmp_path):
    src = phi3_folders("gqa")
    dst = tmp_path / "q4km"
    assert main(["quantize", str(src), str(dst), "--quant", "int4-km"]) == 0
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant"] == "int4-km"
    mem = slmkit.load(src, quant="int4-km")  # the CLI's default dtype, as the folder was written
    disk = slmkit.load(dst)
    a = dict((n, m) for n, m in mem.engine.model.named_modules() if isinstance(m, QuantLinear))
    b = dict((n, m) for n, m in disk.engine.model.named_modules() if isinstance(m, QuantLinear))
    assert a.keys() == b.keys() and {m.bits for m in b.values()} == {4, 8}
    for name, x in a.items():
        for t in ("qweight", "scales", "mins", "super_scales", "super_mins"):
            tx, ty = getattr(x, t), getattr(b[name], t)
            assert (tx is None and ty is None) or torch.equal(tx, ty), (name, t)
    assert torch.equal(mem.logits(PROMPT), disk.logits(PROMPT))


class _NormFed(nn.Module):
    """ids -> embedding (a few loud channels) -> RMSNorm -> two linears; `leak` also adds the norm's
    output to the result, so that rescaling the norm would change the function."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        from slmkit.models.layers import RMSNorm

        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(40, 64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(40, 64, generator=g))
            self.embed.weight[:, :4] *= 30  # outlier channels, as real activations have
        self.norm = RMSNorm(64, offset=1.0, fp32_weight=True)  # Gemma's (1 + w) form
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(64, generator=g) * 0.3)
        self.up, self.gate = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
        with torch.no_grad():
            for lin in (self.up, self.gate):
                lin.weight.copy_(synthetic(96, 64, seed=int(lin is self.gate)) * 50)
        self.head = nn.Linear(96, 40, bias=False)
        self.leak = leak

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        y = self.up(h) * torch.sigmoid(self.gate(h))
        if self.leak:
            y = y + h.repeat(1, 1, 2)[..., :96]
        return self.head(y[:, -1:] if last_only else y)


def test_equalize_folds_scales_into_the_norm_and_keeps_the_function():
    from slmkit.quant.equalize import equalize

    model = _NormFed()
    ids = list(range(40)) * 3
    x = torch.tensor([ids])
    before, w_up = model(x).detach(), model.up.weight.detach().clone()
    feeds: dict[str, set[str]] = {}
    power = input_power(model, ids, ["up", "gate", "head"], feeds)
    assert feeds == {"norm": {"up", "gate"}}  # found by tensor identity; head reads a product
    out = equalize(model, feeds, power, {"up", "gate"}, lambda w, imp: quantize_mixed(w, 32, weights=imp), ids)
    assert set(out) == {"up", "gate"}
    s = model.up.weight[0] / w_up[0]  # the channel scales chosen
    assert not torch.allclose(s, torch.ones(64))
    torch.testing.assert_close(out["up"], power["up"] / s.square(), rtol=1e-4, atol=0)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)  # same function


def test_equalize_undoes_a_fold_that_changes_the_function():
    from slmkit.quant.equalize import equalize

    model = _NormFed(leak=True)  # the same weights and inputs as above, where the fold is made
    ids = list(range(40)) * 3
    w_norm, w_up = model.norm.weight.detach().clone(), model.up.weight.detach().clone()
    feeds: dict[str, set[str]] = {}
    power = input_power(model, ids, ["up", "gate"], feeds)
    assert equalize(model, feeds, power, {"up", "gate"}, lambda w, imp: quantize_mixed(w, 32, weights=imp),
                    ids) == {}
    torch.testing.assert_close(model.norm.weight, w_norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.up.weight, w_up, rtol=1e-5, atol=1e-6)
