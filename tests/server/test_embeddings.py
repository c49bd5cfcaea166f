"""Embeddings over HTTP with the official clients (openai's embeddings.create, ollama's embed /
embeddings) against `slm serve` on a tiny Phi-3, and `slm ps` against it and against no server."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

import slmkit
from tests.helpers.serving import free_port, slm_serve

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "x"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path_factory.mktemp("embed_srv"), "gqa")
    llm = slmkit.load(folder, dtype="float32")
    with slm_serve({"phi": folder}, "--dtype", "float32", "--slots", "2") as base:
        yield base, llm


def test_openai_client_embeddings_equal_llm_embed(served):
    import openai

    base, llm = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    ref = llm.embed(TEXTS)
    for fmt in (None, "float", "base64"):  # None: the client asks for base64 and decodes it itself
        kw = {} if fmt is None else {"encoding_format": fmt}
        r = client.embeddings.create(model="phi", input=TEXTS, **kw)
        rows = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        if fmt == "base64":  # asked for by name, the client hands the string back: little-endian float32
            rows = [np.frombuffer(base64.b64decode(b), dtype="<f4").tolist() for b in rows]
        got = torch.tensor(rows)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in TEXTS) == r.usage.total_tokens
        assert r.model == "phi"
    ids = llm.tokenizer.encode(TEXTS[1])
    r = client.embeddings.create(model="phi", input=[ids, ids])  # token ids, as the API allows
    torch.testing.assert_close(torch.tensor(r.data[1].embedding), ref[1], atol=1e-5, rtol=1e-5)
    assert float(torch.tensor(r.data[0].embedding) @ torch.tensor(r.data[1].embedding)) == pytest.approx(1, abs=1e-5)
    one = client.embeddings.create(model="phi", input=TEXTS[2])
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), ref[2], atol=1e-5, rtol=1e-5)


def test_ollama_client_embed_and_legacy_embeddings(served):
    import ollama

    base, llm = served
    client = ollama.Client(host=base)
    ref = llm.embed(TEXTS)
    r = client.embed(model="phi", input=TEXTS)
    torch.testing.assert_close(torch.tensor(r.embeddings), ref, atol=1e-5, rtol=1e-5)
    assert r.prompt_eval_count == sum(len(llm.tokenizer.encode(t)) for t in TEXTS)
    legacy = client.embeddings(model="phi", prompt=TEXTS[0])
    torch.testing.assert_close(torch.tensor(legacy.embedding), ref[0], atol=1e-5, rtol=1e-5)
    long = "word " * 300  # past the 256-token context: Ollama truncates by default
    cut = client.embed(model="phi", input=long)
    assert cut.prompt_eval_count == llm.context_length
    torch.testing.assert_close(torch.tensor(cut.embeddings), llm.embed(long, truncate=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="phi", input=long, truncate=False)
    assert e.value.status_code == 400
    assert client.embed(model="phi", input=[]).embeddings == []  # Ollama: no input just loads the model


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/embeddings", {"model": "phi"}, "input", "required"),
    ("/v1/embeddings", {"input": []}, "input", "empty"),
    ("/v1/embeddings", {"input": ["a", [1]]}, "input[1]", "mixes"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input[1]", "empty"),
    ("/v1/embeddings", {"input": [[1, -1]]}, "input[0]", "vocabulary"),
    ("/v1/embeddings", {"input": "a", "dimensions": 5}, "dimensions", "dimensions"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format", "base64"),
    ("/v1/embeddings", {"input": ["word " * 300]}, "input[0]", "context length"),
    ("/v1/embeddings", {"input": ["a"] * 2049}, "input", "2048"),
    ("/v1/embeddings", {"input": "a", "model": "nope"}, "model", "nope"),
    ("/api/embed", {"model": "phi", "input": [1, 2]}, "input", "strings"),
    ("/api/embed", {"model": "phi", "input": "a", "truncate": "no"}, "truncate", "true or false"),
    ("/api/embed", {"model": "phi", "input": "a", "options": {"temperature": 1}}, "options.temperature", "apply"),
    ("/api/embeddings", {"model": "phi", "prompt": ["a"]}, "prompt", "string"),
])
def test_bad_bodies_get_400_naming_the_field(served, path, body, param, words):
    base, _ = served
    r = httpx.post(base + path, json=body, timeout=30)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    if "context length" in words:
        assert err["code"] == "context_length_exceeded"


def test_openapi_lists_the_embeddings_schemas(served):
    base, _ = served
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    for path, field in (("/v1/embeddings", "encoding_format"), ("/api/embed", "truncate"),
                        ("/api/embeddings", "prompt")):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["properties"]


def _slm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True, timeout=60)


def test_slm_ps_lists_the_loaded_model(served):
    base, llm = served
    out = _slm("ps", "--host", base, "--json")
    assert out.returncode == 0, out.stderr
    (m,) = json.loads(out.stdout)["models"]
    assert m["name"] == "phi" and m["slots"] == 2 and m["context_length"] == llm.context_length
    assert m["size"] >= llm.describe().weight_bytes > 0 and m["expires_at"].startswith("9999")
    table = _slm("ps", "--host", base.removeprefix("http://"))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["NAME", "SIZE", "SLOTS", "CONTEXT"]
    assert row.split()[0] == "phi" and "Forever" in row and str(llm.context_length) in row.split()


def test_slm_ps_without_a_server_says_so_in_one_line():
    out = _slm("ps", "--host", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no slm serve is running" in lines[0], out.stderr
