"""`slm serve`'s app on a real socket, driven by the official openai and ollama clients and httpx."""
from __future__ import annotations

import json
import threading
import time

import pytest

import slmkit
from tests.helpers.serving import free_port, start_server

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key"


def wait_healthy(base: str) -> None:
    for _ in range(240):
        try:
            if httpx.get(base + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.25)


def serve(llm, **kw):
    return serve_models({"tiny": llm}, api_key=KEY, **kw)


def serve_models(models, api_key="k", **kw):
    from slmkit.server.app import create_app

    return start_server(create_app(models, api_key=api_key, **kw))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return make_phi3_folder(tmp_path_factory.mktemp("srv"), "gqa", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(folder):
    llm = slmkit.load(folder, dtype="float32")
    base, srv, t = serve(llm, max_queue=4)
    yield base, llm
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


MSGS = [{"role": "user", "content": "Say something."}]


def test_chat_matches_the_python_api(client, server):
    _, llm = server
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    want = llm.chat(MSGS, max_new_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids) and r.object == "chat.completion"


def test_a_repeated_conversation_prefix_comes_from_the_prompt_cache(client, server):
    base, _ = server
    metric = 'slmkit_prompt_cache_tokens_total{model="tiny"} '

    def reused() -> int:
        text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return int(next(line for line in text.splitlines() if line.startswith(metric)).split()[-1])

    first = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0)
    before = reused()
    turn = MSGS + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=4, temperature=0)
    assert reused() - before >= first.usage.prompt_tokens - 1  # the first turn's keys were reused
    assert second.choices[0].message.content == server[1].chat(turn, max_new_tokens=4, temperature=0).text


def test_stream_equals_non_stream_and_reports_usage(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == [] and chunks[-1].usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_n_logprobs_json_schema_and_tools(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=1.0, seed=3, n=2,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[1].index == 1
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    tool = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0, tools=[tool],
                                       tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "ping"
    assert isinstance(json.loads(call.function.arguments)["n"], int)


def test_completions_and_models(client):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.object == "text_completion"
    assert [m.id for m in client.models.list()] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"


def test_errors_are_openai_shaped_and_the_server_keeps_serving(client, server):
    base, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, top_p=0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(base + "/health").json()["status"] == "ok"  # no key needed for health
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices


def test_sse_is_strict_data_lines_only(server):
    base, _ = server
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 4, "stream": True}) as r:
        raw = b"".join(r.iter_bytes())
    assert r.headers["content-type"].startswith("text/event-stream")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]" and b"\r" not in raw
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1])


def test_disconnect_mid_stream_frees_the_worker(server, client):
    base, _ = server
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 1500, "stream": True,
                            "temperature": 0, "min_tokens": 1500}) as r:
        next(r.iter_bytes())  # first event, then hang up
    t = time.perf_counter()
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices
    assert time.perf_counter() - t < 20  # the abandoned 1500-token request did not run to its end


def test_ollama_client(server):
    ollama = pytest.importorskip("ollama")
    base, llm = server
    c = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
    r = c.chat(model="tiny", messages=MSGS, options={"temperature": 0, "num_predict": 8})
    assert r.message.content == llm.chat(MSGS, max_new_tokens=8, temperature=0).text
    assert r.done and r.eval_count >= 1 and r.prompt_eval_count > 0
    parts = list(c.chat(model="tiny", messages=MSGS, stream=True, options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    g = c.generate(model="tiny", prompt="Hello", options={"temperature": 0, "num_predict": 5})
    assert g.done and isinstance(g.response, str)
    assert [m.model for m in c.list().models] == ["tiny"]
    assert c.show("tiny").details.family == "phi3"


def test_sixteen_concurrent_streams_with_continuous_batching(folder):
    llm = slmkit.load(folder, dtype="float32")
    prompts = [[{"role": "user", "content": f"Request number {i}: " + "word " * (i % 5)}] for i in range(16)]
    solo = [llm.chat(m, max_new_tokens=8 + i % 4, temperature=0).text for i, m in enumerate(prompts)]
    llm.enable_batching(slots=8, context=512)
    base, srv, t = serve(llm, max_queue=32, workers=8)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        got: list = [None] * 16

        def run(i: int) -> None:
            chunks = client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=8 + i % 4,
                                                    temperature=0, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert got == solo  # none mixed, none lost
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "slmkit_batch_steps_total" in metrics
        assert llm.backend.batch.steps < sum(8 + i % 4 for i in range(16))  # requests shared steps
        # n = 3 streamed under batching: the choices decode together, their events interleave
        kw = dict(model="tiny", messages=prompts[0], max_tokens=6, temperature=0, n=3,  # greedy: rows of a
                  extra_body={"min_tokens": 6})  # batch may differ from one row in the last bits, which can flip a draw
        whole = client.chat.completions.create(**kw)
        order, texts = [], {0: "", 1: "", 2: ""}
        for c in client.chat.completions.create(**kw, stream=True):
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
                order.append(ch.index)
        assert [texts[i] for i in range(3)] == [ch.message.content for ch in whole.choices]
        assert order != sorted(order)  # interleaved: all three requests were in flight at once
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def test_slm_serve_command_starts_and_answers(folder):
    import os
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "SLMKIT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", f"tiny={folder}", "--port", str(port),
                             "--slots", "2", "--dtype", "float32"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(base + "/v1/models").status_code == 401  # the key from the environment is enforced
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "2 slots x 2048 tokens continuously batched" in err and "API key required" in err


def test_stream_with_n_and_with_tools(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=1.0, seed=1,
                                                 n=2, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    whole = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=1.0, seed=1, n=2)
    assert [texts[0], texts[1]] == [ch.message.content for ch in whole.choices]
    tool = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}}
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0,
                                                 tools=[tool], tool_choice="required", stream=True))
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    # streamed as OpenAI does: id and name first, then the arguments' JSON text in pieces
    assert calls[0].id.startswith("call") and calls[0].function.name == "ping" and calls[0].function.arguments == ""
    assert len(calls) >= 2 and all(tc.index == 0 and tc.id is None for tc in calls[1:])
    args = "".join(tc.function.arguments for tc in calls)
    assert isinstance(json.loads(args)["n"], int)
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]


def test_azure_ai_inference_client(server):
    inference = pytest.importorskip("azure.ai.inference")
    from azure.ai.inference.models import SystemMessage, UserMessage
    from azure.core.credentials import AzureKeyCredential

    base, llm = server
    c = inference.ChatCompletionsClient(endpoint=base + "/v1", credential=AzureKeyCredential(KEY))
    msgs = [SystemMessage("Be brief."), UserMessage("Say something.")]
    r = c.complete(messages=msgs, max_tokens=8, temperature=0, model="tiny")
    want = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}],
                    max_new_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    streamed = "".join(u.choices[0].delta.content or "" for u in c.complete(messages=msgs, max_tokens=8,
                                                                             temperature=0, model="tiny", stream=True)
                       if u.choices)
    assert streamed == want.text


def test_chat_page_is_served_and_uses_the_api(server):
    base, _ = server
    r = httpx.get(base + "/")  # no key needed for the page; it sends the key it is given
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


TOOL = {"type": "function", "function": {"name": "ping", "description": "Ping a host n times", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "host": {"type": "string", "enum": ["alpha", "beta\"}"]}},
    "required": ["n", "host"], "additionalProperties": False}}}


def test_streamed_tool_call_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=60, temperature=0,
                                           tools=[TOOL], tool_choice="required")
    (call,) = whole.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=60, temperature=0,
                                                 tools=[TOOL], tool_choice="required", stream=True))
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert deltas[0].function.name == call.function.name
    assert json.loads("".join(d.function.arguments for d in deltas)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": plain content deltas, no tool calls
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                                 tools=[TOOL], tool_choice="none", stream=True))
    assert not any(ch.delta.tool_calls for c in chunks for ch in c.choices)


def test_tool_call_deltas_from_text_pieces():
    from slmkit.server.openai_api import _ToolCallDeltas
    from slmkit.tools import ToolCall

    text = '{"name": "ping", "arguments": {"n": 3, "host": "a\\"b}"}}'
    d = _ToolCallDeltas(True)
    out = [x for i in range(0, len(text), 3) for x in d.feed(text[i:i + 3])]
    out += d.finish([ToolCall("call_1", "ping", {"n": 3, "host": 'a"b}'})])
    assert out[0]["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    args = "".join(x["tool_calls"][0]["function"]["arguments"] for x in out)
    assert json.loads(args) == {"n": 3, "host": 'a"b}'}
    plain = _ToolCallDeltas(True)
    got = plain.feed("  ") + plain.feed("Hello") + plain.feed(" there") + plain.finish(None)
    assert "".join(x["content"] for x in got) == "  Hello there"
    odd = _ToolCallDeltas(True)  # fields in another order: the call comes whole at the end
    got = odd.feed('{"arguments": {}, "name": "ping"}') + odd.finish([ToolCall("c", "ping", {})])
    assert got == [{"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                    "function": {"name": "ping", "arguments": "{}"}}]}]


def test_ollama_tool_call_and_streamed_completions_with_n(server, client):
    ollama = pytest.importorskip("ollama")
    base, llm = server
    c = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
    # Ollama has no tool_choice: "auto", as the Python API gives it for the tool as the client sends it
    from ollama._types import Tool

    sent = Tool.model_validate(TOOL).model_dump(exclude_none=True)  # the client drops min/max
    want = llm.chat(MSGS, tools=[sent], tool_choice="auto", temperature=0, max_new_tokens=60)
    r = c.chat(model="tiny", messages=MSGS, tools=[TOOL], options={"temperature": 0, "num_predict": 60})
    if want.tool_calls:
        assert [(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls] == \
            [(t.name, t.arguments) for t in want.tool_calls]
    else:
        assert r.message.content == want.text and not r.message.tool_calls
    forced = llm.chat(MSGS, tools=[TOOL], tool_choice="required", temperature=0, max_new_tokens=60)
    history = MSGS + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "ping", "arguments": forced.tool_calls[0].arguments}}]},
        {"role": "tool", "content": "pong"}]
    r = c.chat(model="tiny", messages=history, tools=[TOOL], options={"temperature": 0, "num_predict": 5})
    assert r.done  # a conversation with an earlier call and its result is accepted
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=1.0, seed=3,
                                            n=2, stream=True))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for x in ch.choices:
            texts[x.index] += x.text
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=1.0, seed=3, n=2)
    assert [texts[0], texts[1]] == [x.text for x in whole.choices]


def test_slm_serve_two_models_with_keep_alive(folder):
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", f"a={folder}", f"b={folder}", "--port",
                             str(port), "--slots", "1", "--dtype", "float32", "--keep-alive", "1s"],
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        for _ in range(40):  # both unload after 1 s idle
            if not httpx.get(base + "/api/ps").json()["models"]:
                break
            time.sleep(0.25)
        assert httpx.get(base + "/api/ps").json()["models"] == []
        r = httpx.post(base + "/api/generate", json={"model": "b", "prompt": "Hello", "stream": False,
                                                     "options": {"num_predict": 2}})
        assert r.status_code == 200 and r.json()["load_duration"] > 0  # reloaded by the request
        assert httpx.get(base + "/openapi.json").json()["paths"].keys() >= {"/v1/chat/completions", "/api/chat"}
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert err.count("[a: ") == 1 and err.count("[b: ") == 2 and "unloaded after 1s idle" in err


def test_more_bad_input_gets_named_errors(server):
    base, _ = server
    h = {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        return httpx.post(base + path, headers=h, json=body, timeout=30)

    r = post("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "stream": True, "stream_options": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{bad"}}]}]
    r = post("/v1/chat/completions", {"model": "tiny", "messages": history, "tools": [TOOL]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
    r = post("/api/generate", {"model": "tiny", "prompt": "", "keep_alive": 0})  # given loaded: it stays
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    r = post("/api/generate", {"model": "tiny", "prompt": "Hi", "options": {"num_predict": "many"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "options.num_predict"
    r = post("/api/generate", {"model": "tiny", "prompt": "Hi", "stream": False,
                               "options": {"num_predict": -2, "num_ctx": 40}})
    assert r.status_code == 200 and r.json()["done_reason"] == "length"  # -2: until the context is full
    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 2, "seed": -1}),
                       ("/api/chat", {"model": "tiny", "messages": MSGS, "stream": False,
                                      "options": {"num_predict": 2, "seed": -1}})):
        assert post(path, body).status_code == 200  # a negative seed means a random one (llama.cpp, Ollama)
    r = post("/api/chat", {"model": "tiny:latest", "messages": MSGS, "stream": False, "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["model"] == "tiny"  # Ollama's default tag names the same model
    r = post("/v1/chat/completions", {"model": "nope", "messages": MSGS})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(base + "/health").status_code == 200


def test_an_error_mid_stream_uses_the_stream_framing(server, monkeypatch):
    base, llm = server
    real = llm.backend.stream_tokens

    def failing(*a, **kw):
        for i, step in enumerate(real(*a, **kw)):
            if i == 2:
                raise RuntimeError("the engine broke")
            yield step

    monkeypatch.setattr(llm.backend, "stream_tokens", failing)
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": MSGS, "options": {"num_predict": 8, "temperature": 0}}
    lines = httpx.post(base + "/api/chat", headers=h, json=body, timeout=30).text.strip().splitlines()
    assert json.loads(lines[-1]) == {"error": "the engine broke"}  # Ollama's NDJSON error line
    events = httpx.post(base + "/v1/chat/completions", headers=h, timeout=30,
                        json={"model": "tiny", "messages": MSGS, "max_tokens": 8, "stream": True}).text
    last = json.loads(events.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["type"] == "server_error" and "the engine broke" in last["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", headers=h, json={"model": "tiny", "messages": MSGS, "max_tokens": 8})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"  # JSON, not a text page


def test_slm_serve_refuses_a_kv_plan_that_does_not_fit(folder, monkeypatch, capsys):
    import uvicorn

    from slmkit import cli
    from slmkit.loading import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 512 * 2**20 + 1024)  # 1 KiB over the headroom
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a plan that does not fit"))
    assert cli.main(["serve", f"tiny={folder}", "--slots", "8", "--slot-context", "2048"]) == 1
    err = capsys.readouterr().err  # the memory plan refuses before loading
    assert err.startswith("error: ") and "2048 tokens x 8 slot(s)" in err and "does not fit" in err
    # room for the weights and some of the KV: the advice names slm serve's own flags
    monkeypatch.setattr(memory, "available_bytes", lambda: 512 * 2**20 + 4 * 2**20)
    assert cli.main(["serve", f"tiny={folder}", "--slots", "8", "--slot-context", "2048"]) == 1
    err = capsys.readouterr().err
    assert "use --slot-context" in err and "use --slots" in err and "--parallel" not in err


@pytest.mark.parametrize("flag,value", [("--max-loaded", "0"), ("--slots", "0"), ("--max-queue", "-1"),
                                        ("--slot-context", "many")])
def test_slm_serve_names_a_bad_number(flag, value, capsys):
    from slmkit import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be a positive integer" in capsys.readouterr().err
