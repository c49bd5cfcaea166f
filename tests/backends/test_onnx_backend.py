"""onnx:./folder on a tiny Phi-3 converted by ORT GenAI's own model builder (fp32): greedy tokens
and logits equal to the native engine on the source folder, chat equal to ORT GenAI's own
tokenizer + greedy loop, and every GenerationOption through our processors over its logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slmkit
from slmkit.errors import ConfigError, ModelFileError, UnsupportedByBackendError

og = pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def pair(phi3_hf, phi3_ort):
    return slmkit.load(phi3_hf, dtype="float32"), slmkit.load(f"onnx:{phi3_ort}")


def test_greedy_and_logits_match_native(pair):
    native, ox = pair
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert ox.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    # no sampling options: genai_config.json's "search" (the builder writes do_sample false) means greedy
    assert ox.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids == want[:8]
    torch.testing.assert_close(ox.logits(prompt), native.logits(prompt), atol=1e-4, rtol=1e-4)


def test_chat_equals_ort_genai_own_loop(pair, phi3_ort):
    _, ox = pair
    msgs = [{"role": "user", "content": "Tell me a story"}]
    ours = ox.chat(msgs, max_new_tokens=16, temperature=0, ignore_eos=True)
    model = og.Model(str(phi3_ort))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps(msgs), add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert list(ids) == ox.tokenizer.encode(prompt, add_special_tokens=False)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 16, min_length=len(ids) + 16)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    theirs = [int(t) for t in gen.get_sequence(0)[len(ids):]]
    assert ours.token_ids == theirs and ours.text == tok.decode(np.array(theirs, dtype=np.int32))


def test_options_run_through_our_processors(pair):
    native, ox = pair
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, repetition_penalty=1.3, logprobs=True,
              top_logprobs=2)
    a, b = native.generate("Once upon", **kw), ox.generate("Once upon", **kw)
    assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
    assert ox.describe().format == "onnx" and ox.capabilities.backend == "onnx"
    with pytest.raises(UnsupportedByBackendError, match="num_beams"):
        ox.generate("x", num_beams=2)


def test_load_options_refused(phi3_ort):
    with pytest.raises(UnsupportedByBackendError, match="dtype.*onnx"):
        slmkit.load(f"onnx:{phi3_ort}", dtype="bfloat16")
    with pytest.raises(UnsupportedByBackendError, match="quant"):
        slmkit.load(f"onnx:{phi3_ort}", quant="int4")


def test_bad_folders(tmp_path, phi3_hf, phi3_ort):
    with pytest.raises(ModelFileError, match="genai_config.json.*builder"):
        slmkit.load(f"onnx:{phi3_hf}")  # an HF folder: says how to convert it
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in phi3_ort.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "genai_config.json").read_text())
    vocab, cfg["model"]["vocab_size"] = cfg["model"]["vocab_size"], "many"
    (bad / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vocab_size"):
        slmkit.load(f"onnx:{bad}")
    cfg["model"]["vocab_size"] = vocab
    (bad / "genai_config.json").write_text(json.dumps(cfg))
    (bad / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="ONNX Runtime GenAI cannot load it"):
        slmkit.load(f"onnx:{bad}")
