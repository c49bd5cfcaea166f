"""The cloud presets (github, azure, nim, openai) against a local recorder that checks each
request's method, path, headers and body as each provider documents them (spec A1-A3, A6): no
cloud is reachable here. Keys never appear in error text."""
from __future__ import annotations

import base64
import io
import os
import socket
import time

import pytest
from PIL import Image

import slmkit
from slmkit.errors import (
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitError,
    ProviderTimeoutError,
    ProviderUnreachableError,
    UnsupportedByBackendError,
)
from tests.helpers.recorder import Recorder, chunks

KEY = "ghp_SECRET0123456789abcdefXYZ"
MSGS = [{"role": "user", "content": "hi"}]
CHAT = "/inference/chat/completions"


@pytest.fixture
def rec():
    r = Recorder()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def no_ambient_keys(monkeypatch, tmp_path):
    for name in ("GITHUB_TOKEN", "GH_TOKEN", "NVIDIA_API_KEY", "OPENAI_API_KEY", "AZURE_AI_API_KEY",
                 "AZURE_INFERENCE_CREDENTIAL", "AZURE_AI_ENDPOINT", "AZURE_INFERENCE_ENDPOINT", "OPENAI_ORG_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def github(rec, model="microsoft/Phi-3.5-mini-instruct", **kw):
    return slmkit.load(f"github:{model}", api_key=KEY, base_url=rec.url + "/inference", **kw)


def png(size=(8, 8), noise=False) -> bytes:
    im = Image.effect_noise(size, 80).convert("RGB") if noise else Image.new("RGB", size, (200, 10, 10))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_github_request_is_exactly_the_documented_one(rec):
    rec.reply("POST", CHAT, events=chunks(["Hel", "lo", "!"], usage=(11, 3)))
    llm = github(rec)
    r = llm.chat([{"role": "system", "content": "be brief"}, *MSGS], max_new_tokens=64, temperature=0.2,
                 top_p=0.9, seed=3, stop=["\n\n"], presence_penalty=0.5)
    assert (r.text, r.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens) == ("Hello!", "stop", 11, 3)
    (q,) = rec.requests
    assert (q.method, q.path) == ("POST", CHAT)
    assert q.headers["authorization"] == f"Bearer {KEY}" and q.headers["content-type"] == "application/json"
    assert q.headers["x-github-api-version"] == "2022-11-28"
    assert "api-key" not in q.headers and "openai-organization" not in q.headers
    assert q.json == {"model": "microsoft/Phi-3.5-mini-instruct", "stream": True,
                      "stream_options": {"include_usage": True},
                      "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                      "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 3, "stop": ["\n\n"],
                      "presence_penalty": 0.5}
    assert llm.capabilities.token_ids is False and llm.stats().tokens_generated == 3


def test_github_streams_pieces_and_bare_names_gain_the_publisher(rec):
    rec.reply("POST", CHAT, events=chunks(["a", "b", "c"], finish="length"))
    llm = github(rec, "Phi-3.5-mini-instruct")
    out = list(llm.chat(MSGS, stream=True))
    assert [c.text for c in out[:-1]] == ["a", "b", "c"] and out[-1].finish_reason == "length"
    assert out[-1].usage.completion_tokens == 2 and rec.requests[0].json["model"] == "microsoft/Phi-3.5-mini-instruct"


def test_github_free_tier_limits_are_checked_before_sending(rec):
    llm = github(rec)
    with pytest.raises(ContextLengthError, match="input limit") as e:
        llm.chat([{"role": "user", "content": "word " * 7000}])  # 35000 characters: ~8754 tokens estimated
    assert e.value.limit == 8000 and e.value.length > 8000
    with pytest.raises(ContextLengthError, match="output limit"):
        llm.chat(MSGS, max_new_tokens=4001)
    assert rec.requests == []  # nothing went out
    rec.reply("POST", CHAT, events=chunks(["ok"]))
    assert github(rec, max_input_tokens=0).chat([{"role": "user", "content": "word " * 7000}]).text == "ok"


def test_phi_on_github_refuses_what_the_provider_does_not_take(rec):
    llm = github(rec)
    for kw in ({"top_k": 5}, {"logprobs": True}, {"json_schema": {"type": "object"}}, {"repetition_penalty": 1.1},
               {"logit_bias": {"1": 1.0}}):
        with pytest.raises(UnsupportedByBackendError) as e:
            llm.chat(MSGS, **kw)
        assert e.value.backend == "github" and e.value.param == next(iter(kw))
    with pytest.raises(UnsupportedByBackendError, match="tools"):
        llm.chat(MSGS, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(UnsupportedByBackendError, match="images"):  # a text model
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}])
    with pytest.raises(UnsupportedByBackendError, match="prompt"):  # chat only
        llm.generate("Once upon")
    assert rec.requests == []


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": CITY}}]


def test_tools_go_out_and_calls_come_back_parsed(rec):
    deltas = [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city": '}}, {"index": 0, "function": {"arguments": '"Oslo"}'}}]
    rec.reply("POST", CHAT, events=chunks([], finish="tool_calls", tool_deltas=deltas))
    llm = github(rec, "openai/gpt-4.1-mini")  # not a Phi model: GitHub documents tools for it
    r = llm.chat(MSGS, tools=TOOLS, tool_choice="auto")
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
    call = r.tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_9", "get_weather", {"city": "Oslo"})
    assert rec.requests[0].json["tools"] == TOOLS and rec.requests[0].json["tool_choice"] == "auto"
    # the call and its result go back in OpenAI's shape
    rec.reply("POST", CHAT, events=chunks(["Sunny"]))
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]
    assert llm.chat(history, tools=TOOLS).text == "Sunny"
    sent = rec.requests[1].json["messages"]
    assert sent[1]["tool_calls"] == [{"id": "call_9", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}


def test_azure_v1_route_api_key_and_one_image(rec, tmp_path):
    img = tmp_path / "chart.png"
    img.write_bytes(png())
    rec.reply("POST", "/openai/v1/chat/completions", events=chunks(["a chart"]))
    llm = slmkit.load("azure:Phi-3.5-vision-instruct", api_key=KEY, base_url=rec.url + "/openai/v1/")
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": str(img),
                                                                                           "detail": "high"}}]
    with pytest.warns(UserWarning, match="system"):
        r = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}])
    assert r.text == "a chart"
    (q,) = rec.requests
    assert q.headers["api-key"] == KEY and q.headers["authorization"] == f"Bearer {KEY}"
    assert q.headers["content-type"] == "application/json" and "x-github-api-version" not in q.headers
    url = f"data:image/png;base64,{base64.b64encode(img.read_bytes()).decode()}"
    assert q.json == {"model": "Phi-3.5-vision-instruct", "stream": True, "stream_options": {"include_usage": True},
                      "max_tokens": 512, "messages": [
                          {"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                       {"type": "image_url", "image_url": {"url": url,
                                                                                          "detail": "high"}}]}]}
    two = [*parts, {"type": "image_url", "image_url": {"url": str(img)}}]
    with pytest.raises(UnsupportedByBackendError, match="one image per message"):
        llm.chat([{"role": "user", "content": two}])
    with pytest.raises(InvalidRequestError, match="endpoint"):
        slmkit.load("azure:Phi-3.5-mini-instruct", api_key=KEY)


def test_azure_endpoint_forms():
    from slmkit.backends.cloud import azure_base_url

    assert azure_base_url("https://r.openai.azure.com/openai/v1/") == "https://r.openai.azure.com/openai/v1"
    assert azure_base_url("https://r.services.ai.azure.com/models") == "https://r.services.ai.azure.com/openai/v1"
    assert azure_base_url("https://d.eastus2.models.ai.azure.com") == "https://d.eastus2.models.ai.azure.com/v1"


def test_nim_inline_image_and_asset_upload(rec, tmp_path):
    small, big = tmp_path / "s.png", tmp_path / "b.png"
    small.write_bytes(png())
    big.write_bytes(png((300, 300), noise=True))
    assert len(base64.b64encode(big.read_bytes())) > 180_000
    llm = slmkit.load("nim:microsoft/phi-3.5-vision-instruct", api_key=KEY, base_url=rec.url + "/v1",
                      assets_url=rec.url + "/v2/nvcf/assets")
    rec.reply("POST", "/v1/chat/completions", events=chunks(["red"]))
    msg = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                        {"type": "image_url", "image_url": {"url": str(small)}}]}]
    assert llm.chat(msg, max_new_tokens=16).text == "red"
    b64 = base64.b64encode(small.read_bytes()).decode()
    assert rec.requests[0].json["messages"] == [{"role": "user",
                                                 "content": f'Describe <img src="data:image/png;base64,{b64}" />'}]
    assert rec.requests[0].headers["authorization"] == f"Bearer {KEY}" and "api-key" not in rec.requests[0].headers
    assert rec.requests[0].headers["content-type"] == "application/json"
    assert rec.requests[0].json["max_tokens"] == 16
    assert rec.requests[0].json["model"] == "microsoft/phi-3.5-vision-instruct"
    # over 180k base64 characters: NVCF assets
    rec.reply("POST", "/v2/nvcf/assets", json_body={"uploadUrl": rec.url + "/upload/a1?sig=x", "assetId": "a1"})
    rec.reply("PUT", "/upload/a1")
    rec.reply("POST", "/v1/chat/completions", events=chunks(["noise"]))
    rec.reply("DELETE", "/v2/nvcf/assets/a1")
    msg[0]["content"][1]["image_url"]["url"] = str(big)
    assert llm.chat(msg).text == "noise"
    create, put, chat, delete = rec.requests[1:]
    assert create.headers["authorization"] == f"Bearer {KEY}" and create.json == {
        "contentType": "image/png", "description": "slmkit image"}
    assert put.body == big.read_bytes() and "authorization" not in put.headers  # a pre-signed URL gets no key
    assert put.headers["content-type"] == "image/png" and put.query == {"sig": ["x"]}
    assert put.headers["x-amz-meta-nvcf-asset-description"] == "slmkit image"
    assert chat.json["messages"][0]["content"] == 'Describe <img src="data:image/png;asset_id,a1" />'
    assert chat.headers["nvcf-input-asset-references"] == "a1" and chat.headers["nvcf-function-asset-ids"] == "a1"
    assert (delete.method, delete.path) == ("DELETE", "/v2/nvcf/assets/a1")


def test_openai_compatible_without_key_and_completions(rec):
    rec.reply("POST", "/v1/completions", events=[{"id": "c", "object": "text_completion", "created": 1, "model": "m",
                                                  "choices": [{"index": 0, "text": " upon", "finish_reason": None}]},
                                                 {"id": "c", "object": "text_completion", "created": 1, "model": "m",
                                                  "choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
                                                 "[DONE]"])
    llm = slmkit.load(f"openai:phi@{rec.url}/v1")
    r = llm.generate("Once", max_new_tokens=2)
    assert (r.text, r.finish_reason) == (" upon", "length")
    q = rec.requests[0]
    assert "authorization" not in q.headers and q.json["prompt"] == "Once" and q.json["model"] == "phi"
    with pytest.raises(InvalidRequestError, match="MODEL@BASE_URL"):
        slmkit.load("openai:phi")


def test_provider_errors_are_typed_and_never_show_the_key(rec):
    echo = {"error": {"message": f"Bad credentials: {KEY}", "type": "invalid_request_error", "code": "unauthorized"}}
    rec.reply("POST", CHAT, status=401, json_body=echo)
    with pytest.raises(ProviderAuthError) as e:
        github(rec).chat(MSGS)
    assert e.value.status == 401 and "Bad credentials" in str(e.value) and KEY not in str(e.value)
    assert KEY[:12] not in str(e.value) and KEY not in repr(github(rec).backend)
    rec.reply("POST", CHAT, status=500, json_body={"error": {"message": "model crashed", "code": "server"}})
    rec.reply("POST", CHAT, status=500, json_body={"error": {"message": "model crashed", "code": "server"}})
    with pytest.raises(ProviderError, match="model crashed") as e:
        github(rec, max_retries=1).chat(MSGS)
    assert e.value.status == 500 and len(rec.requests) == 3  # 401 once, 500 twice (one retry)
    rec.reply("POST", CHAT, status=400, json_body={"error": {"message": "filtered", "code": "content_filter"}})
    with pytest.raises(ProviderError, match=r"filtered \(content_filter\)"):
        github(rec).chat(MSGS)


def test_rate_limit_is_retried_after_the_providers_delay(rec):
    rec.reply("POST", CHAT, status=429, headers={"retry-after": "1"}, json_body={"error": {"message": "slow down"}})
    rec.reply("POST", CHAT, events=chunks(["fine"]))
    t0 = time.perf_counter()
    assert github(rec).chat(MSGS).text == "fine"
    assert time.perf_counter() - t0 >= 0.95 and len(rec.requests) == 2
    for _ in range(2):
        rec.reply("POST", CHAT, status=429, headers={"retry-after-ms": "50"}, json_body={"error": {"message": "slow"}})
    with pytest.raises(ProviderRateLimitError) as e:
        github(rec, max_retries=1).chat(MSGS)
    assert e.value.retry_after == pytest.approx(0.05) and e.value.status == 429


def test_timeout_offline_and_mid_stream_error(rec):
    rec.reply("POST", CHAT, delay=1.5, events=chunks(["late"]))
    t0 = time.perf_counter()
    with pytest.raises(ProviderTimeoutError):
        github(rec, timeout=0.3, max_retries=0).chat(MSGS)
    assert time.perf_counter() - t0 < 1.4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(ProviderUnreachableError, match="cannot reach") as e:
        slmkit.load("github:microsoft/Phi-3.5-mini-instruct", api_key=KEY, base_url=f"http://127.0.0.1:{port}",
                    max_retries=0).chat(MSGS)
    assert KEY not in str(e.value)
    rec.reply("POST", CHAT, events=[*chunks(["par"])[:2], {"error": {"message": "overloaded mid-way"}}])
    with pytest.raises(ProviderError, match="overloaded mid-way"):
        github(rec).chat(MSGS)


def test_keys_from_env_and_a_private_file(rec, monkeypatch, tmp_path):
    with pytest.raises(ProviderAuthError, match="GITHUB_TOKEN"):
        slmkit.load("github:microsoft/Phi-3.5-mini-instruct", base_url=rec.url)
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-from-env")
    rec.reply("POST", "/v1/chat/completions", events=chunks(["x"]))
    slmkit.load("nim:microsoft/phi-3.5-mini-instruct", base_url=rec.url + "/v1").chat(MSGS)
    assert rec.requests[-1].headers["authorization"] == "Bearer nvapi-from-env"
    keys = tmp_path / "config" / "slmkit" / "keys.json"
    keys.parent.mkdir(parents=True)
    keys.write_text('{"github": "from-file-0123456789"}')
    os.chmod(keys, 0o644)
    with pytest.raises(ConfigError, match="chmod 600") as e:
        slmkit.load("github:microsoft/Phi-3.5-mini-instruct", base_url=rec.url)
    assert "from-file" not in str(e.value)
    os.chmod(keys, 0o600)
    rec.reply("POST", "/chat/completions", events=chunks(["y"]))
    slmkit.load("github:microsoft/Phi-3.5-mini-instruct", base_url=rec.url).chat(MSGS)
    assert rec.requests[-1].headers["authorization"] == "Bearer from-file-0123456789"


def test_open_options_are_checked():
    with pytest.raises(InvalidRequestError, match="unknown option 'temprature'"):
        slmkit.load("github:microsoft/Phi-3.5-mini-instruct", api_key=KEY, temprature=1)
    with pytest.raises(InvalidRequestError, match="dtype"):
        slmkit.load("nim:microsoft/phi-3.5-mini-instruct", api_key=KEY, dtype="float16")
    for kw in ({"timeout": -1}, {"connect_timeout": "5"}, {"max_retries": 99}, {"max_input_tokens": 1.5},
               {"base_url": "ftp://x"}):
        with pytest.raises(InvalidRequestError) as e:
            slmkit.load("github:microsoft/Phi-3.5-mini-instruct", api_key=KEY, **kw)
        assert e.value.param == next(iter(kw))
    with pytest.raises(InvalidRequestError, match="http"):
        slmkit.load("openai:phi@localhost:8000")


def test_azure_inference_sdk_path(rec):
    from tests.helpers.recorder import completion

    rec.reply("POST", "/chat/completions", json_body=completion("Hi there", usage=(6, 2)))
    with pytest.warns(FutureWarning, match="retired on 2026-08-26"):
        llm = slmkit.load("azure:Phi-3.5-mini-instruct", api_key=KEY, base_url=rec.url, sdk="azure-ai-inference")
    r = llm.chat(MSGS, max_new_tokens=32, temperature=0.1)
    assert (r.text, r.usage.prompt_tokens, r.usage.completion_tokens) == ("Hi there", 6, 2)
    (q,) = rec.requests
    assert q.query == {"api-version": ["2024-05-01-preview"]}
    assert q.headers["authorization"] == f"Bearer {KEY}" and q.headers["api-key"] == KEY
    assert q.json == {"messages": MSGS, "model": "Phi-3.5-mini-instruct", "max_tokens": 32, "temperature": 0.1}
    rec.reply("POST", "/chat/completions", status=401, json_body={"error": {"code": "401", "message": f"no {KEY}"}})
    with pytest.raises(ProviderAuthError) as e:
        llm.chat(MSGS)
    assert KEY not in str(e.value)


def test_slm_run_with_an_image_on_nim(rec, tmp_path, capsys, monkeypatch):
    from slmkit.cli import main

    img = tmp_path / "photo.png"
    img.write_bytes(png())
    keys = tmp_path / "config" / "slmkit" / "keys.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(f'{{"nim": {{"api_key": "{KEY}", "base_url": "{rec.url}/v1"}}}}')
    os.chmod(keys, 0o600)
    rec.reply("POST", "/v1/chat/completions", events=chunks(["A red ", "square."]))
    assert main(["run", "nim:microsoft/phi-3.5-vision-instruct", "Describe", "--image", str(img),
                 "--max-tokens", "20"]) == 0
    assert capsys.readouterr().out == "A red square.\n"
    q = rec.requests[0]
    b64 = base64.b64encode(img.read_bytes()).decode()
    assert q.headers["authorization"] == f"Bearer {KEY}" and q.json["max_tokens"] == 20
    assert q.json["messages"] == [{"role": "user", "content": f'<img src="data:image/png;base64,{b64}" /> Describe'}]


def test_keys_toml_and_a_broken_keys_file(rec, tmp_path):
    folder = tmp_path / "config" / "slmkit"
    folder.mkdir(parents=True)
    toml = folder / "keys.toml"
    toml.write_text(f'[openai]\napi_key = "toml-key-0123456789"\nbase_url = "{rec.url}/v1"\n')
    os.chmod(toml, 0o400)  # read-only for its owner: also private
    rec.reply("POST", "/v1/chat/completions", events=chunks(["z"]))
    assert slmkit.load("openai:phi@http://unused.invalid/v1", base_url=rec.url + "/v1").chat(MSGS).text == "z"
    assert rec.requests[-1].headers["authorization"] == "Bearer toml-key-0123456789"
    broken = folder / "keys.json"
    broken.write_text('{"github": "secret-in-a-broken-file",')
    os.chmod(broken, 0o600)
    with pytest.raises(ConfigError, match="keys.json") as e:
        slmkit.load("github:microsoft/Phi-3.5-mini-instruct")
    assert "secret-in-a-broken-file" not in str(e.value)
