"""transformers:./folder: the same tokens as the native engine (greedy), logits within float error,
and every GenerationOption through our own processors over its logits."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.errors import ModelFileError, UnsupportedByBackendError


@pytest.fixture(scope="module")
def pair(phi3_folders):
    folder = phi3_folders("gqa")
    return slmkit.load(folder, dtype="float32"), slmkit.load(f"transformers:{folder}", dtype="float32")


def test_greedy_and_logits_match_native(pair):
    native, tf = pair
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert tf.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    torch.testing.assert_close(tf.logits(prompt), native.logits(prompt), atol=1e-4, rtol=1e-4)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    assert tf.chat(msgs, max_new_tokens=12, temperature=0).text == native.chat(msgs, max_new_tokens=12,
                                                                               temperature=0).text


def test_options_run_through_our_processors(pair):
    native, tf = pair
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, repetition_penalty=1.3, logprobs=True,
              top_logprobs=2)
    a, b = native.generate("Once upon", **kw), tf.generate("Once upon", **kw)
    assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
    assert tf.describe().format == "transformers" and tf.capabilities.backend == "transformers"
    with pytest.raises(UnsupportedByBackendError, match="num_beams"):
        tf.generate("x", num_beams=2)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFileError):
        slmkit.load(f"transformers:{tmp_path}")
