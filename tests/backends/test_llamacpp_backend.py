"""llamacpp:./x.gguf: llama.cpp's logits under our tokenizer, template, stop ids and sampler give the
native engine's tokens on the same F32 GGUF (a tiny Phi-3 written by tests/helpers/gguf_models.py,
which follows llama.cpp's converter; the converter script itself, convert_hf_to_gguf.py, ships with
llama.cpp's sources, not with llama-cpp-python, so it is not available here)."""
from __future__ import annotations

import pytest

import slmkit
from slmkit.errors import ContextLengthError, InvalidRequestError, ModelFileError, UnsupportedByBackendError
from tests.helpers.gguf_models import hf_to_gguf

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_path(phi3_folders, tmp_path_factory):
    return hf_to_gguf(phi3_folders("gqa"), tmp_path_factory.mktemp("lc") / "tiny-phi3-f32.gguf")


@pytest.fixture(scope="module")
def pair(gguf_path):
    native = slmkit.load(gguf_path, dtype="float32")
    lc = slmkit.load(f"llamacpp:{gguf_path}", n_threads=2, logits_all=True)
    yield native, lc
    lc.close()


def test_greedy_32_tokens_equal_native(pair):
    native, lc = pair
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert lc.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    # llama.cpp's float32 kernels sum in another order: logits agree to float error, not bit for bit
    ids = prompt + want
    theirs, ours = lc.logits(ids), native.logits(ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-3 * ours.abs().max().item() + 1e-3
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    a = native.chat(msgs, max_new_tokens=12, temperature=0, ignore_eos=True)
    b = lc.chat(msgs, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert b.token_ids == a.token_ids and b.text == a.text  # same template, same prompt ids


def test_tokenizer_template_and_stop_ids_are_the_native_ones(pair):
    native, lc = pair
    assert lc.tokenizer.chat_template == native.tokenizer.chat_template
    assert lc.tokenizer.encode("Hello, Grüße 你好") == native.tokenizer.encode("Hello, Grüße 你好")
    assert lc.backend.info.eos_token_ids == native.engine.eos_token_ids
    assert lc.backend.context_length == native.engine.context_length == 256  # n_ctx: the file's (under 8192)
    assert lc.capabilities.backend == "llamacpp" and lc.describe().format == "gguf"


def test_options_run_through_our_sampler(pair):
    native, lc = pair
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, repetition_penalty=1.3, logprobs=True)
    a, b = native.generate("Once upon", **kw), lc.generate("Once upon", **kw)
    assert b.token_ids == a.token_ids and len(b.logprobs) == len(b.token_ids)
    with pytest.raises(UnsupportedByBackendError, match="num_beams"):
        lc.generate("x", num_beams=2)


def test_logits_need_logits_all_and_context_is_n_ctx(gguf_path):
    lc = slmkit.load(f"llamacpp:{gguf_path}", n_ctx=16, n_threads=2)
    try:
        assert lc.backend.context_length == 16 and not lc.capabilities.logits
        with pytest.raises(UnsupportedByBackendError, match="llamacpp"):
            lc.logits([1, 2, 3])
        with pytest.raises(ContextLengthError):  # over n_ctx: refused before llama.cpp sees it
            lc.generate(list(range(1, 20)), max_new_tokens=2)
    finally:
        lc.close()


def test_bad_input(tmp_path, gguf_path):
    with pytest.raises(ModelFileError):
        slmkit.load(f"llamacpp:{tmp_path / 'missing.gguf'}")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError):
        slmkit.load(f"llamacpp:{tmp_path / 'junk.gguf'}")
    with pytest.raises(InvalidRequestError, match="n_gpu"):
        slmkit.load(f"llamacpp:{gguf_path}", n_gpu=3)
    with pytest.raises(InvalidRequestError, match="n_ctx"):
        slmkit.load(f"llamacpp:{gguf_path}", n_ctx=0)


def test_slm_serve_fronts_llama_cpp(pair):
    """slm serve's app over the llamacpp backend, reached as a running Ollama: the native answer."""
    pytest.importorskip("fastapi")
    pytest.importorskip("ollama")
    from slmkit.server.app import create_app
    from tests.helpers.serving import start_server, stop_server

    native, lc = pair
    base, srv, t = start_server(create_app({"lc": lc}))
    try:
        remote = slmkit.load(f"ollama+{base}/lc")
        msgs = [{"role": "user", "content": "Why is the sky blue?"}]
        assert remote.chat(msgs, max_new_tokens=10, temperature=0).text == \
            native.chat(msgs, max_new_tokens=10, temperature=0).text
        assert remote.describe().context_length == lc.backend.context_length
        remote.close()
    finally:
        stop_server(srv, t)
