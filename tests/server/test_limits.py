"""slm serve under hostile input: bounded bodies (413 / 408), big inputs kept off the event loop,
a 4xx naming the field for every malformed body (never a 500), CORS before auth, a header
timeout for half-open connections, and max_tokens checked against the context."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

import slmkit
from tests.helpers.serving import free_port, start_server, stop_server

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

KEY = "k"
H = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
MSGS = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path_factory.mktemp("limits"), "gqa", max_position_embeddings=512)
    return slmkit.load(folder, dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    from slmkit.server.app import create_app

    app = create_app({"tiny": llm}, api_key=KEY, cors_origins=[ORIGIN], max_body=256 * 1024, body_timeout=2.0)
    base, srv, t = start_server(app, header_timeout=0.5)
    yield base
    stop_server(srv, t)


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------ item 2: bounded bodies
def test_a_declared_body_over_the_limit_is_413_before_it_is_read(server):
    r = httpx.post(server + "/v1/completions", headers=H, content=b" " * (300 * 1024))
    err = assert_error(r, 413, "body")
    assert "262144 bytes" in err["message"] and err["code"] == "request_too_large"
    assert httpx.get(server + "/health").status_code == 200


def test_a_chunked_body_is_counted_as_it_arrives(server):
    def pieces():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"x" * 16384  # 640 KiB in all, with no Content-Length
        yield b'"}'

    r = httpx.post(server + "/v1/completions", headers=H, content=pieces())
    assert_error(r, 413, "body")


def test_a_body_that_stops_arriving_gets_408(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        reply = b""
        while piece := s.recv(65536):  # until the server closes the connection
            reply += piece
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_health_answers_while_a_big_body_is_parsed(server, monkeypatch):
    """The JSON of a big body is parsed on a worker thread: the event loop keeps answering."""
    real, release, parsing = json.loads, threading.Event(), threading.Event()

    def slow_loads(s, *a, **kw):
        if len(s) > 100_000:  # the big request's body: hold it until /health has answered
            parsing.set()
            release.wait(30)
        return real(s, *a, **kw)

    monkeypatch.setattr(json, "loads", slow_loads)
    result = {}
    big = {"model": "tiny", "prompt": "word " * 30_000, "max_tokens": 1}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(server + "/v1/completions", headers=H,
                                                                    json=big, timeout=60)))
    t.start()
    try:
        assert parsing.wait(30)
        assert httpx.get(server + "/health", timeout=10).status_code == 200  # a timeout here: the loop is blocked
    finally:
        release.set()
        t.join(60)
    assert result["r"].status_code in (200, 400)


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing_it(server, llm, monkeypatch):
    seen: list[int] = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode",
                        lambda text, *a, **kw: seen.append(len(text)) or encode(text, *a, **kw))
    for path, body in (("/v1/completions", {"prompt": "ab " * 60_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab " * 60_000}]})):
        err = assert_error(httpx.post(server + path, headers=H, json={"model": "tiny", **body}), 400, None)
        assert err["code"] == "context_length_exceeded" and "512 tokens" in err["message"]
    assert all(n < 10_000 for n in seen), seen  # the 180,000-character texts never reached the tokenizer
    with pytest.raises(slmkit.errors.ContextLengthError):
        llm.generate("ab " * 60_000)


# ------------------------------------------------------------------ item 4: 4xx naming the field, never 500
DEEP = b"[" * 5000 + b"]" * 5000
BAD_BODIES = [  # (route, raw JSON body, the param the error must name)
    ("/v1/chat/completions", b'{"model": "tiny", "messages": ' + DEEP + b"}", "body"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             b'"response_format": {"type": "json_schema", "json_schema": {"schema": '
                             + b'{"items": ' * 150 + b"{}" + b"}" * 150 + b"}}}", "response_format..."),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "body"),
    # "²" is a digit to str.isdigit() but no token id: a text key, biasing its tokens (llama.cpp's rule)
    ("/v1/completions", json.dumps({"prompt": "hi", "logit_bias": {"\u00b2": 1}, "max_tokens": 1}).encode(), 200),
    ("/v1/completions", json.dumps({"prompt": "hi", "logit_bias": {"1" * 5000: 1}}).encode(), "logit_bias"),
    ("/v1/completions", json.dumps({"prompt": "hi", "seed": "x", "stream": True}).encode(), "seed"),
    ("/v1/completions", json.dumps({"prompt": "hi", "seed": [1], "n": 2}).encode(), "seed"),
    ("/v1/chat/completions", json.dumps({"messages": MSGS, "seed": "x", "stream": True}).encode(), "seed"),
    ("/v1/chat/completions", json.dumps({"messages": MSGS, "seed": [1], "n": 2, "stream": True}).encode(), "seed"),
    ("/api/chat", json.dumps({"model": "tiny", "messages": MSGS, "options": {"seed": "x"}}).encode(),
     "options.seed"),
    ("/api/generate", json.dumps({"model": "tiny", "prompt": "hi", "images": 5}).encode(), "images"),
    ("/api/generate", json.dumps({"model": "tiny", "prompt": "hi", "images": True}).encode(), "images"),
    ("/api/chat", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": 5}]}
                             ).encode(), "messages[0].images"),
    ("/v1/chat/completions", json.dumps({"messages": "hi", "tools": [TOOL]}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [5], "tools": [TOOL]}).encode(), "messages[0]"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}], "tools": [TOOL]}).encode(),
     "messages[0].content"),
    ("/v1/chat/completions", json.dumps({"messages": MSGS + [{"role": "assistant", "tool_calls": [{"function": 5}]}],
                                         "tools": [TOOL]}).encode(), "messages[1].tool_calls[0]"),
    ("/v1/chat/completions", json.dumps({"messages": MSGS + [{"role": "assistant", "content": [
        {"type": "text", "text": "x"}], "tool_calls": [{"function": {"name": "ping", "arguments": "{}"}}]}],
        "tools": [TOOL], "max_tokens": 2}).encode(), 200),  # list content with an earlier call: accepted
    ("/v1/chat/completions", json.dumps({"messages": MSGS + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "ping", "arguments": "[" * 3000 + "]" * 3000}}]}], "tools": [TOOL]}).encode(),
     "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", json.dumps({"messages": MSGS, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": 5}}).encode(), "tool_choice"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/api/generate", b'{"model": "tiny", "prompt": "hi", "system": "\\ud800"}', "system"),
    ("/v1/completions", b'{"prompt": "hi", "stream": "yes"}', "stream"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "body"),
]


@pytest.mark.parametrize("path,raw,param", BAD_BODIES, ids=[f"{i}:{c[0]}" for i, c in enumerate(BAD_BODIES)])
def test_bad_bodies_get_a_4xx_naming_the_field(server, path, raw, param):
    r = httpx.post(server + path, headers={**H, "Content-Type": "application/json"}, content=raw, timeout=60)
    if param == 200:
        assert r.status_code == 200, r.text
        return
    err = assert_error(r, 400, None if param.endswith("...") else param)
    assert err["param"].startswith(param.removesuffix("..."))


def test_the_python_api_raises_typed_errors_for_the_same_input(llm):
    from slmkit.errors import InvalidRequestError

    cases = [
        (lambda: llm.generate("hi", logit_bias={"1" * 5000: 1}, max_new_tokens=1), "logit_bias"),
        (lambda: llm.generate("hi", logit_bias={"\ud800": 1}, max_new_tokens=1), "logit_bias"),
        (lambda: llm.generate("hi", seed="x", n=2, max_new_tokens=1), "seed"),
        (lambda: llm.generate("a\ud800b", max_new_tokens=1), "prompt"),
        (lambda: llm.chat([{"role": "user", "content": "\udfff"}], max_new_tokens=1), "messages[0].content"),
        (lambda: llm.chat("hi", tools=[TOOL]), "messages"),
        (lambda: llm.chat([5], tools=[TOOL]), "messages[0]"),
        (lambda: llm.chat(MSGS + [{"role": "assistant", "tool_calls": [{"function": 5}]}], tools=[TOOL]),
         "messages[1].tool_calls[0]"),
        (lambda: llm.chat(MSGS, tools=[TOOL], tool_choice={"type": "function", "function": 5}), "tool_choice"),
    ]
    for call, param in cases:
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.param == param


# ------------------------------------------------------------------ item 7: CORS, header timeout, max_tokens
def test_a_preflight_is_answered_before_auth_and_a_401_carries_cors_headers(server):
    r = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN, **H})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
        assert s.recv(1024) == b""  # closed by the server (a socket.timeout here: held open)
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as s:  # after a response too
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert s.recv(1024) == b""


def test_a_request_whose_headers_are_in_may_take_longer_than_the_header_timeout(server):
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(1.0)  # twice the header timeout, within the body timeout
        s.sendall(body)
        assert read_response(s).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_over_the_context_is_refused(server, stream):
    for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MSGS})):
        r = httpx.post(server + path, headers=H, json={"model": "tiny", "max_tokens": 10**6, "stream": stream, **body})
        err = assert_error(r, 400, "max_tokens")
        assert "1000000" in err["message"] and "512" in err["message"]
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 512, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", headers=H, json=body) as r:
        assert r.status_code == 200  # the whole context is allowed (the stream is left after its headers)


def test_openapi_describes_every_post_body(server):
    doc = httpx.get(server + "/openapi.json", headers=H).json()
    posts = {p: ops["post"] for p, ops in doc["paths"].items() if "post" in ops}
    assert set(posts) >= {"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"}
    for path, op in posts.items():
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and schema["properties"], path


def test_the_default_body_limit_carries_a_requests_images_base64_encoded(llm):
    """A body at the default limit can hold the most image bytes a request may have (images.py),
    base64-encoded as data: URLs, with room for the text; slm serve and create_app share it."""
    import base64

    from slmkit.server import images
    from slmkit.server.app import create_app
    from slmkit.server.body import DEFAULT_MAX_BODY

    b64 = lambda n: len(base64.b64encode(b"\0" * n))  # noqa: E731
    assert b64(images.MAX_TOTAL_BYTES) + 8 * 2**20 <= DEFAULT_MAX_BODY
    assert images.MAX_IMAGES * b64(images.MAX_BYTES) > DEFAULT_MAX_BODY  # (the total is the binding limit)
    app = create_app({"tiny": llm})
    base, srv, t = start_server(app)
    try:  # 17 MiB of image (23 MiB as base64, over the old 16 MiB default) reaches the route: the model refuses it
        big = "data:image/png;base64," + base64.b64encode(b"\0" * (17 * 2**20)).decode()
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={"model": "tiny", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]})
        assert_error(r, 400, "messages")
        assert "text-only" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/completions", content=b" " * (DEFAULT_MAX_BODY + 1))
        assert_error(r, 413, "body")
    finally:
        stop_server(srv, t)


@pytest.mark.parametrize("args,limit", [([], None), (["--max-body", "1M"], 2**20)])
def test_slm_serve_passes_its_body_limit_to_the_app(args, limit, monkeypatch):
    from slmkit import cli
    from slmkit.server import app

    seen = {}

    def create_app(models, **kw):
        seen.update(kw)
        raise SystemExit(0)  # stop before loading or listening

    monkeypatch.setattr(app, "create_app", create_app)
    monkeypatch.setattr(slmkit, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        cli.main(["serve", "--port", str(free_port()), *args])
    assert "api_key" in seen and seen.get("max_body") == limit  # None: create_app's DEFAULT_MAX_BODY


# ------------------------------------------------------------------ item 6: slm serve's listen options
@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "argument --port: must be a port number 1-65535, got 70000"),
    (["--port", "0"], "argument --port: must be a port number 1-65535, got 0"),
    (["--host", "bad..host!"], "argument --host: not an address to listen on: 'bad..host!'"),
    (["--max-body", "0"], "argument --max-body: must be a size like 16M"),
    (["--header-timeout", "-1"], "argument --header-timeout: must be a positive number of seconds"),
])
def test_slm_serve_names_a_bad_listen_option(args, message, capsys, monkeypatch):
    import uvicorn

    from slmkit import cli

    monkeypatch.setattr(slmkit, "load", lambda *a, **k: pytest.fail("loaded a model for a bad command line"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served with a bad option"))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err


def test_slm_serve_says_when_it_cannot_listen_before_loading(capsys, monkeypatch):
    import uvicorn

    from slmkit import cli

    monkeypatch.setattr(slmkit, "load", lambda *a, **k: pytest.fail("loaded a model it cannot serve"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "in use" in err


def test_tokenizing_a_long_text_lets_other_threads_run(llm):
    """A long prompt tokenizes on a worker thread without holding the GIL, so the server's event
    loop (here: the main thread) keeps running meanwhile; tokenizers' encode() holds it throughout."""
    text = "hello world, this is a test. " * 40_000  # ~1.2 M characters: a second or so of tokenizing
    state = {"running": False, "done": False}

    def tokenize():
        state["running"] = True
        state["ids"] = llm.tokenizer.encode(text)
        state["done"] = True

    t = threading.Thread(target=tokenize)
    t.start()
    steps = 0
    while not state["done"]:
        if state["running"]:
            steps += 1  # the main thread ran Python while the tokenizer worked
        time.sleep(0)
    t.join()
    assert steps > 100, steps  # holding the GIL allows a handful at the edges of the call
    want = llm.tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert state["ids"][len(state["ids"]) - len(want):] == want  # the ids tokenizers' encode() gives
