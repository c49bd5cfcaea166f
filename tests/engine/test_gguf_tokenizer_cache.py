"""The GGUF load cache's tokenizer file (loading/gguf_cache.py): a tokenizer built from GGUF metadata
is stored as plain lists and strings and rebuilt into the very tokenizer it was (the same JSON, the
same ids for every sample text), for SentencePiece-style and byte-level BPE files and the built-in
model's 262k-token vocabulary; anything else is kept as its JSON. The file is read by an unpickler
that refuses every class, a damaged or missing one beside valid weights is rebuilt from the file."""
from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

import slmkit
from slmkit.gguf import open_gguf
from slmkit.loading import gguf as gguf_loading
from slmkit.loading import gguf_cache
from slmkit.text.gguf_tokenizer import tokenizer_from_gguf_metadata
from slmkit.text.tokenizer import Tokenizer
from tests.gguf.test_tokenizer_gguf import gpt2_gguf_metadata
from tests.helpers.gguf_models import hf_to_gguf, tokenizer_metadata

SAMPLES = ["Hello, can you call some tools for me? Grüße 你好", "  leading and   inner spaces\n\n\ttabs  ",
           "<start_of_turn>user\nhi<end_of_turn>\n<|user|>x<|end|>", "🤖 日本語 ünïcödé \x00\x7f",
           "def f(x):\n    return x", "", " "]


def round_trip(tok: Tokenizer) -> dict:
    """tokenizer_state through a pickle and the plain unpickler, rebuilt: the same tokenizer."""
    state = gguf_cache._PlainUnpickler(io.BytesIO(pickle.dumps(gguf_cache.tokenizer_state(tok), 5))).load()
    back = gguf_cache.tokenizer_from_state(state)
    assert json.loads(back.backend.to_str()) == json.loads(tok.backend.to_str())
    for s in SAMPLES:
        ids = tok.encode(s)
        assert back.encode(s) == ids and back.decode(ids) == tok.decode(ids)
    for k in ("bos_token", "eos_token", "add_bos", "add_eos", "chat_template", "vocab_size", "special_ids"):
        assert getattr(back, k) == getattr(tok, k)
    return state


def test_the_built_in_models_tokenizer_comes_back_as_it_was():
    from slmkit.sources.builtin import builtin_model_path

    f = open_gguf(builtin_model_path())
    state = round_trip(tokenizer_from_gguf_metadata(f.metadata))
    assert len(state["tokens"]) == 262144 and len(state["merges"]) > 500_000 and "json" not in state
    assert state["merges"][0][0] is state["tokens"][state["tokens"].index(state["merges"][0][0])]  # shared


@pytest.mark.parametrize("parts", [True, False])
@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2"])
def test_tiny_gguf_tokenizers_come_back_as_they_were(kind, parts, phi3_folders):
    """From the BPE model's inputs the build kept (bpe_parts), or (without them) as its whole JSON."""
    meta = (tokenizer_metadata(phi3_folders("gqa"), name="tiny") if kind == "sentencepiece"
            else gpt2_gguf_metadata("llama-bpe"))
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.bpe_parts is not None
    if not parts:
        tok.bpe_parts = None
    assert ("tokens" if parts else "json") in round_trip(tok)


def test_other_models_are_kept_as_json():
    tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    state = round_trip(Tokenizer.from_tokenizer(tk, eos_token="b"))
    assert "json" in state and "tokens" not in state


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", str(root))
    return root


def test_a_damaged_or_hostile_tokenizer_file_is_rebuilt_never_run(phi3_folders, tmp_path, cache, monkeypatch):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / "m.gguf", "Q8_0")
    built = []
    real = gguf_loading.tokenizer_from_gguf_metadata
    monkeypatch.setattr(gguf_loading, "tokenizer_from_gguf_metadata", lambda m: built.append(1) or real(m))
    want = [slmkit.load(path).tokenizer.encode(s) for s in SAMPLES]
    gguf_cache.wait()
    (tok_file,) = cache.glob("*.tokenizer")
    assert len(built) == 1
    assert [slmkit.load(path).tokenizer.encode(s) for s in SAMPLES] == want and len(built) == 1  # from the cache
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for damage in (tok_file.read_bytes()[:1000], pickle.dumps({"format": gguf_cache.FORMAT, "fingerprint": "x",
                                                              "state": Hostile()}), b""):
        tok_file.write_bytes(damage)
        assert [slmkit.load(path).tokenizer.encode(s) for s in SAMPLES] == want
        gguf_cache.wait()
        assert not marker.exists()
    assert len(built) == 4  # rebuilt each time from the file, and stored again:
    assert [slmkit.load(path).tokenizer.encode(s) for s in SAMPLES] == want and len(built) == 4
    tok_file.unlink()
    assert [slmkit.load(path).tokenizer.encode(s) for s in SAMPLES] == want and len(built) == 5
