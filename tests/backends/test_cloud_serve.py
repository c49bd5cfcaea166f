"""The openai: preset against `slm serve` itself (the tiny Phi-3 behind our own server answers as it
does in-process), `slm run` with a provider string, and `slm serve` fronting a cloud: the provider's
failures become 502 / 429 + Retry-After / 503 for the server's clients, never with the key."""
from __future__ import annotations

import socket

import httpx
import pytest

import slmkit
from slmkit.cli import main
from slmkit.server.app import create_app
from tests.helpers.recorder import Recorder, chunks
from tests.helpers.serving import start_server, stop_server

MSGS = [{"role": "user", "content": "Tell me a story"}]
SRV_KEY, CLOUD_KEY = "server-key-0123456789", "ghp_CLOUDSECRET0123456789"


@pytest.fixture(scope="module")
def served(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"))
    base, srv, t = start_server(create_app({"tiny": llm}, api_key=SRV_KEY))
    yield llm, base
    stop_server(srv, t)


def test_openai_preset_against_slm_serve_equals_in_process(served):
    llm, base = served
    remote = slmkit.load(f"openai:tiny@{base}/v1", api_key=SRV_KEY)
    want = llm.chat(MSGS, max_new_tokens=12, temperature=0)
    got = remote.chat(MSGS, max_new_tokens=12, temperature=0)
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                      want.usage.completion_tokens)
    pieces = list(remote.chat(MSGS, max_new_tokens=12, temperature=0, stream=True))
    assert "".join(c.text for c in pieces) == want.text and pieces[-1].usage.completion_tokens == 12
    lp = remote.chat(MSGS, max_new_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert len(lp.logprobs) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.logprobs)
    stop = want.text[3:6]
    assert remote.chat(MSGS, max_new_tokens=12, temperature=0, stop=[stop]).text == \
        llm.chat(MSGS, max_new_tokens=12, temperature=0, stop=[stop]).text
    assert remote.generate("Once upon", max_new_tokens=6, temperature=0).text == \
        llm.generate("Once upon", max_new_tokens=6, temperature=0).text
    with pytest.raises(slmkit.errors.ProviderAuthError):  # our server wants its key
        slmkit.load(f"openai:tiny@{base}/v1", api_key="wrong").chat(MSGS)


def test_slm_run_with_a_provider_string(served, capsys, monkeypatch):
    llm, base = served
    monkeypatch.setenv("OPENAI_API_KEY", SRV_KEY)
    assert main(["run", f"openai:tiny@{base}/v1", "Tell me a story", "--temperature", "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == llm.chat(MSGS, max_new_tokens=8, temperature=0).text + "\n"


@pytest.fixture
def fronted():
    rec = Recorder()
    cloud = slmkit.load("github:microsoft/Phi-3.5-mini-instruct", api_key=CLOUD_KEY,
                        base_url=rec.url + "/inference", max_retries=0)
    base, srv, t = start_server(create_app({"phi": cloud}))
    yield rec, base
    stop_server(srv, t)
    rec.close()


def post(base, **body):
    return httpx.post(f"{base}/v1/chat/completions", json={"model": "phi", "messages": MSGS, **body}, timeout=30)


def test_slm_serve_fronts_a_cloud(fronted):
    rec, base = fronted
    rec.reply("POST", "/inference/chat/completions", events=chunks(["Once", " upon"], usage=(9, 2)))
    r = post(base, max_tokens=20, temperature=0.3)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Once upon"
    assert r.json()["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    sent = rec.requests[-1]
    assert sent.json["max_tokens"] == 20 and sent.json["temperature"] == 0.3
    assert sent.headers["authorization"] == f"Bearer {CLOUD_KEY}"
    rec.reply("POST", "/inference/chat/completions", events=chunks(["a", "b"]))
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"model": "phi", "messages": MSGS,
                                                                   "stream": True}, timeout=30) as s:
        body = s.read().decode()
    assert s.status_code == 200 and '"content":"a"' in body.replace(" ", "") and body.rstrip().endswith("[DONE]")
    r = post(base, top_k=4)  # an option the provider does not take: refused by name
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_provider_failures_through_the_server(fronted):
    rec, base = fronted
    rec.reply("POST", "/inference/chat/completions", status=401,
              json_body={"error": {"message": f"bad token {CLOUD_KEY}", "code": "unauthorized"}})
    r = post(base)
    assert r.status_code == 502 and "credentials" in r.json()["error"]["message"] and CLOUD_KEY not in r.text
    rec.reply("POST", "/inference/chat/completions", status=429, headers={"retry-after": "7"},
              json_body={"error": {"message": "rate limited"}})
    r = post(base)
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and "rate limited" in r.text
    rec.reply("POST", "/inference/chat/completions", status=503, json_body={"error": {"message": "down"}})
    r = post(base)
    assert r.status_code == 502 and "down" in r.json()["error"]["message"]
    rec.reply("POST", "/inference/chat/completions", status=422, json_body={"error": {"message": "bad role"}})
    r = post(base)
    assert r.status_code == 400 and "bad role" in r.text


def test_unreachable_cloud_is_503():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cloud = slmkit.load("nim:microsoft/phi-3.5-mini-instruct", api_key=CLOUD_KEY, base_url=f"http://127.0.0.1:{port}",
                        max_retries=0)
    base, srv, t = start_server(create_app({"phi": cloud}))
    try:
        r = post(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unreachable"
        assert "retry-after" in r.headers
    finally:
        stop_server(srv, t)


def test_slm_serve_takes_provider_strings(monkeypatch, tmp_path):
    import uvicorn

    from tests.helpers.serving import free_port

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("GITHUB_TOKEN", CLOUD_KEY)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["serve", "github:microsoft/Phi-3.5-mini-instruct", "openai:phi@http://127.0.0.1:9/v1",
                 "nim=nim:microsoft/phi-3.5-vision-instruct", "--port", str(free_port())]) == 1  # no NVIDIA key
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-x")
    assert main(["serve", "github:microsoft/Phi-3.5-mini-instruct", "openai:phi@http://127.0.0.1:9/v1",
                 "nim=nim:microsoft/phi-3.5-vision-instruct", "--port", str(free_port())]) == 0
    registry = apps[-1].state.registry
    try:
        assert list(registry.entries) == ["Phi-3.5-mini-instruct", "phi", "nim"]
        assert registry.entry("nim").info["images"] is True
        assert registry.entry("Phi-3.5-mini-instruct").info["model_type"] == "phi3"
    finally:
        registry.close()
