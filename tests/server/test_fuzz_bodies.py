"""Body-schema fuzz of every POST route, driven by the server's own OpenAPI document: thousands of
bodies (tests/helpers/body_fuzz.py) against slm serve with continuous batching on a tiny model. No
answer may be a 5xx, every 4xx has OpenAI's error body, no stream may carry a server error, no
exception other than a SlmkitError may escape the model's API, and the server answers after.

SLMKIT_FUZZ_EXAMPLES sets the number of bodies (a bounded default here; `make fuzz` runs many
more) and SLMKIT_FUZZ_SEED the seed (a failure prints the seed and body to replay)."""
from __future__ import annotations

import json
import os

import pytest

import slmkit
from slmkit.errors import SlmkitError
from tests.helpers.body_fuzz import BodyFuzzer
from tests.helpers.serving import start_server, stop_server

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("SLMKIT_FUZZ_EXAMPLES", "600"))
SEED = int(os.environ.get("SLMKIT_FUZZ_SEED", "11"))
KEY = "k"


def record_escapes(llm, escaped: list) -> None:
    """Wrap llm.chat / llm.generate (and the streams they return) to record any exception that is
    not a SlmkitError: user input must never cause one."""
    def watch(fn):
        def call(*a, **kw):
            try:
                out = fn(*a, **kw)
            except Exception as e:
                if not isinstance(e, SlmkitError):
                    escaped.append(e)
                raise
            return stream(out) if kw.get("stream") else out
        return call

    def stream(chunks):
        try:
            yield from chunks
        except Exception as e:
            if not isinstance(e, SlmkitError):
                escaped.append(e)
            raise

    llm.chat, llm.generate = watch(llm.chat), watch(llm.generate)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from slmkit.server.app import create_app
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path_factory.mktemp("fuzz"), "gqa", max_position_embeddings=192)
    llm = slmkit.load(folder, dtype="float32")
    llm.enable_batching(slots=2, context=192)  # slm serve's default mode; answers end within 192 tokens
    escaped: list = []
    record_escapes(llm, escaped)
    base, srv, t = start_server(create_app({"tiny": llm}, api_key=KEY, workers=2))
    yield base, escaped
    stop_server(srv, t)


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}\n-> {r.status_code} {r.text[:2000]}"
    if r.status_code >= 400:
        err = r.json().get("error")
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, f"{what}\n-> {r.text}"
        return
    kind = r.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        for e in events[:-1] if events[-1:] == ["[DONE]"] else events:
            assert '"server_error"' not in e, f"{what}\n-> a server error in the stream: {e[:2000]}"
    elif kind.startswith("application/json"):
        json.loads(r.text)


def test_every_route_survives_its_schema_fuzzed(server):
    base, escaped = server
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    doc = httpx.get(base + "/openapi.json", headers=h).json()
    routes = sorted((path, op["post"]["requestBody"]["content"]["application/json"]["schema"])
                    for path, op in doc["paths"].items() if "post" in op)
    assert len(routes) >= 5  # every POST route describes its body
    fuzz = BodyFuzzer(SEED, "tiny")
    with httpx.Client(headers=h, timeout=120) as client:
        for i in range(EXAMPLES):
            path, schema = routes[i % len(routes)]
            raw = fuzz.body(schema)
            what = f"seed {SEED}, example {i}: POST {path} {raw[:3000]!r}"
            try:
                r = client.post(base + path, content=raw)
            except httpx.HTTPError as e:  # a hang (the engine stopped) or a dropped connection: name the body
                pytest.fail(f"{what}\n-> no answer: {e!r}")
            check(r, what)
            assert not escaped, f"{what}\n-> an untyped error escaped the model's API: {escaped[0]!r}"
        assert client.get(base + "/health").json()["status"] == "ok"
        r = client.post(base + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # still serving
