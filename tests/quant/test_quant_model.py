"""load(quant=...), GGUF blocks run directly, `slm quantize` folders: on tiny random models."""
from __future__ import annotations

import json

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.errors import InvalidRequestError, ModelFileError, WeightError
from slmkit.kernels.qgemm import get_kernel
from slmkit.quant.linear import QuantLinear, use_kernel
from tests.helpers.gguf_models import hf_to_gguf

PROMPT = list(range(5, 25))


def quant_layers(llm) -> list[QuantLinear]:
    return [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]


def greedy(llm, n: int = 32) -> list[int]:
    return llm.generate(PROMPT, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.mark.parametrize("quant,group", [("int4", None), ("int4", 32), ("int8", None), ("int8", 128)])
def test_quantized_model_tracks_the_float_model(phi3_folders, quant, group):
    folder = phi3_folders("gqa")
    ref = slmkit.load(folder, dtype="float32")
    llm = slmkit.load(folder, dtype="float32", quant=quant, group_size=group)
    layers = quant_layers(llm)
    assert len(layers) == 4 * llm.engine.args.num_hidden_layers + 1  # qkv, o, gate_up, down; lm_head
    lm_head = llm.engine.model.lm_head
    assert lm_head.bits == 8 and all(m.bits == int(quant[-1]) for m in layers if m is not lm_head)
    a, b = ref.logits(PROMPT), llm.logits(PROMPT)
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item()
    # random tiny models amplify weight noise (int4 round-to-nearest on N(0, 0.08) weights): loose
    # bounds here, a broken quantizer gives rel ~1.4; the real-weights check is test_builtin_quality
    assert rel < (0.08 if quant == "int8" else 0.7)
    assert rel > 1e-4  # and it did change the weights
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (0.9 if quant == "int8" else 0.5)


def test_int4_greedy_tokens_same_through_kernel_and_fallback(phi3_folders):
    if get_kernel() is None:
        pytest.skip("the compiled kernel is unavailable on this machine")
    for variant in ("gqa", "longrope"):
        llm = slmkit.load(phi3_folders(variant), quant="int4", group_size=32)
        with use_kernel(True):
            fast = greedy(llm, 48)
        with use_kernel(False):
            slow = greedy(llm, 48)
        assert fast == slow


def test_fallback_runs_bfloat16_models(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="bfloat16", quant="int8")
    with use_kernel(False):
        out = llm.generate(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q8_0", 8), ("Q5_1", 5), ("Q5_0", 5)])
def test_gguf_blocks_run_without_dequantizing(phi3_folders, tmp_path, qtype, bits):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / f"m-{qtype}.gguf", qtype)
    direct = slmkit.load(path, dtype="float32")
    layers = quant_layers(direct)
    assert layers and all(m.bits == bits and m.group == 32 for m in layers)
    deq = slmkit.load(path, dtype="float32", quant="none")
    assert not quant_layers(deq)
    # same weights exactly; only the int8 rounding of activations differs
    for m in layers:
        name = next(n for n, mod in direct.engine.model.named_modules() if mod is m)
        assert torch.equal(m.dequantized(), deq.engine.model.get_submodule(name).weight)
    a, b = deq.logits(PROMPT), direct.logits(PROMPT)
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item() < 0.05


def test_quantize_cli_writes_a_folder_that_loads_without_requantizing(phi3_folders, tmp_path, capsys):
    src = phi3_folders("gqa")
    dst = tmp_path / "q4"
    assert main(["quantize", str(src), str(dst), "--quant", "int4", "--group-size", "32"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "slmkit", "format": 1, "quant": "int4", "group_size": 32}
    assert (dst / "tokenizer.json").is_file()
    mem = slmkit.load(src, quant="int4", group_size=32)
    disk = slmkit.load(dst)
    for a, b in zip(quant_layers(mem), quant_layers(disk)):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert greedy(mem) == greedy(disk)
    assert main(["quantize", str(src), str(dst), "--quant", "int8"]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_quantize_cli_from_gguf_keeps_the_tokenizer(phi3_folders, tmp_path):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / "m.gguf", "F16")
    dst = tmp_path / "q8"
    assert main(["quantize", str(path), str(dst), "--quant", "int8"]) == 0
    a, b = slmkit.load(path, quant="int8"), slmkit.load(dst)
    text = "Hello, can you call some tools for me? Grüße 你好"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    assert a.tokenizer.chat_template == b.tokenizer.chat_template
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    assert a.chat(msgs, max_new_tokens=8, ignore_eos=True).token_ids == \
        b.chat(msgs, max_new_tokens=8, ignore_eos=True).token_ids


def test_damaged_quantized_folder_is_a_named_error(phi3_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "q"
    assert main(["quantize", str(phi3_folders("gqa")), str(dst), "--quant", "int4"]) == 0
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    name = "model.layers.0.mlp.down_proj.scales"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(WeightError, match="down_proj.scales"):
        slmkit.load(dst)
    save_file(tensors, str(f), metadata={"slmkit.quant": "{not json"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        slmkit.load(dst)


@pytest.mark.parametrize("kw,param", [({"quant": "int3"}, "quant"), ({"quant": "int4", "group_size": 48}, "group_size"),
                                      ({"group_size": 64}, "group_size"), ({"quant": "int8", "group_size": True},
                                                                          "group_size")])
def test_bad_quant_arguments_are_named_before_loading(kw, param):
    with pytest.raises(InvalidRequestError) as e:
        slmkit.load("/nonexistent/model", **kw)
    assert e.value.param == param
