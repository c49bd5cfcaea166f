"""mlx:./folder: mlx-lm's Phi-3 over the same HF folder gives the native engine's greedy tokens and
logits at float32, LongRoPE (short factors, then the long ones past original_max) and a partial
rotary included; options run through our processors; bad input is a typed error."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.errors import InvalidRequestError, ModelFileError, UnsupportedByBackendError

pytest.importorskip("mlx_lm")


@pytest.mark.parametrize("variant", ["gqa", "longrope", "partial_rotary"])
def test_greedy_and_logits_match_native(phi3_folders, variant):
    folder = phi3_folders(variant)
    native, mlx = slmkit.load(folder, dtype="float32"), slmkit.load(f"mlx:{folder}", dtype="float32")
    prompt = [1, 5, 9, 20, 33]  # LongRoPE: 5 + 32 tokens cross original_max 32 while generating
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert mlx.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    long = list(range(3, 48))  # past original_max: the long factors from the first position
    for ids in (prompt, long):
        torch.testing.assert_close(mlx.logits(ids), native.logits(ids), atol=1e-4, rtol=1e-4)


def test_sliding_window_caps_the_context(phi3_folders):
    folder = phi3_folders("mha_sliding")  # window 8: mlx-lm's phi3 attends to everything
    native, mlx = slmkit.load(folder, dtype="float32"), slmkit.load(f"mlx:{folder}", dtype="float32")
    assert mlx.backend.context_length == 8
    ids = [1, 5, 9, 20]
    want = native.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True).token_ids
    assert mlx.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True).token_ids == want
    with pytest.raises(slmkit.errors.ContextLengthError):
        mlx.generate(list(range(3, 12)), max_new_tokens=2)


def test_options_chat_and_refusals(phi3_folders):
    folder = phi3_folders("gqa")
    native, mlx = slmkit.load(folder, dtype="float32"), slmkit.load(f"mlx:{folder}", dtype="float32")
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, repetition_penalty=1.3, logprobs=True)
    a, b = native.generate("Once upon", **kw), mlx.generate("Once upon", **kw)
    assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    assert mlx.chat(msgs, max_new_tokens=12).text == native.chat(msgs, max_new_tokens=12).text
    assert mlx.describe().format == "mlx" and mlx.capabilities.backend == "mlx" and mlx.describe().dtype == "float32"
    with pytest.raises(UnsupportedByBackendError, match="num_beams"):
        mlx.generate("x", num_beams=2)


def test_bad_input(phi3_folders, tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        slmkit.load(f"mlx:{tmp_path}")
    with pytest.raises(InvalidRequestError, match="device"):
        slmkit.load(f"mlx:{phi3_folders('gqa')}", device="cuda")
    with pytest.raises(InvalidRequestError, match="nonsense"):
        slmkit.load(f"mlx:{phi3_folders('gqa')}", nonsense=1)


def test_gemma3_matches_native_and_an_irregular_layer_order_is_refused(tmp_path):
    from slmkit.errors import UnsupportedModelError
    from tests.helpers.tiny_models import make_gemma3_folder

    folder = make_gemma3_folder(tmp_path / "g", num_hidden_layers=6, layer_types=None)  # 5 sliding, 1 full
    native, mlx = slmkit.load(folder, dtype="float32"), slmkit.load(f"mlx:{folder}", dtype="float32")
    ids = list(range(3, 30))  # past the window of 8
    torch.testing.assert_close(mlx.logits(ids), native.logits(ids), atol=1e-4, rtol=1e-4)
    kw = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    assert mlx.generate([2, 5, 9], **kw).token_ids == native.generate([2, 5, 9], **kw).token_ids
    odd = make_gemma3_folder(tmp_path / "odd")  # sliding, sliding, full, sliding: not a period mlx-lm has
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        slmkit.load(f"mlx:{odd}", dtype="float32")
