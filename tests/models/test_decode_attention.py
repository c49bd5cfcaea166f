"""Model level: the compiled attention (decode steps and prompts) gives the tokens of the PyTorch
(SDPA) path."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.kernels import qgemm as kernel
from slmkit.models import layers
from tests.helpers.tiny_models import make_gemma3_folder

pytestmark = [pytest.mark.skipif(kernel.get_kernel() is None, reason="the compiled kernel is unavailable here"),
              pytest.mark.usefixtures("kernel_variant")]  # the picked kernel and AVX2 (tests/conftest.py)


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("gemma3-attn"))


def counting(monkeypatch) -> list[int]:
    calls = [0]
    real = layers.decode_attention

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(layers, "decode_attention", wrapped)
    return calls


@pytest.mark.parametrize("model", ["phi3-mha_sliding", "phi3-gqa", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_equal_with_the_kernel_on_and_off(phi3_folders, gemma3_folder, monkeypatch, model, dtype):
    folder = gemma3_folder if model == "gemma3" else phi3_folders(model.split("-", 1)[1])
    llm = slmkit.load(folder, dtype=dtype)
    prompt = torch.randint(3, llm.engine.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    calls = counting(monkeypatch)
    on = llm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert calls[0] > 0  # decode steps went through the kernel (40 tokens > the sliding windows of 8)
    monkeypatch.setattr(kernel, "decode_attention_enabled", False)
    off = llm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert len(set(off)) > 4
    if dtype == "float32":
        assert on == off
    elif on != off:
        # bfloat16: SDPA rounds the softmax weights to bfloat16 before the V product, the kernel does
        # not (its outputs are the float64 result correctly rounded), so greedy paths may part at a
        # near tie (the prompt's attention goes through the kernel too, so possibly at the first
        # tokens): there the two picks' logits must be within a few bfloat16 steps, either way
        i = next(i for i, (a, b) in enumerate(zip(on, off)) if a != b)
        for enabled in (False, True):
            monkeypatch.setattr(kernel, "decode_attention_enabled", enabled)
            logits = llm.logits(prompt + off[:i])[-1]
            assert abs(logits[on[i]] - logits[off[i]]).item() <= 0.02 * logits.abs().max().item()


@pytest.mark.parametrize("model", ["phi3-mha_sliding", "gemma3"])
def test_continuous_batching_tokens_equal_with_the_kernel_on_and_off(phi3_folders, gemma3_folder, monkeypatch,
                                                                      model):
    folder = gemma3_folder if model == "gemma3" else phi3_folders(model.split("-", 1)[1])
    llm = slmkit.load(folder, dtype="float32")
    llm.enable_batching(slots=4, context=96)
    prompts = [list(range(5 + i, 9 + 3 * i)) for i in range(4)]  # rows at different lengths

    def run() -> list[list[int]]:
        import threading

        got: list = [None] * 4

        def one(i: int) -> None:
            got[i] = llm.generate(prompts[i], max_new_tokens=20 + i, temperature=0, ignore_eos=True).token_ids

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return got

    calls = counting(monkeypatch)
    on = run()
    assert calls[0] > 0
    monkeypatch.setattr(kernel, "decode_attention_enabled", False)
    assert run() == on
