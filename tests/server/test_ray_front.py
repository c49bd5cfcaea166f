"""The Ray front's fault rules without a Ray instance (serving.ray_front; the replicas' handle faked by
scripted answers, each a list of ASGI message batches and how it ends): a replica lost before any of
its answer went out is tried again and the client sees only the second answer; lost mid-stream, an
SSE stream ends with OpenAI's error event and an NDJSON stream with Ollama's error line; every try
lost is a 503; a replica's own failure is not retried; a request without the API key is forwarded
with its body unread; an oversized body is refused before any replica sees it. And the replica's
end: the app run in-process streams its messages, and closing the stream cancels the app."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError  # noqa: E402

from slmkit.serving.ray import ATTEMPTS_HEADER  # noqa: E402
from slmkit.serving.ray_front import SlmkitFront, prefix_key, run_asgi  # noqa: E402

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
NDJSON = [(b"content-type", b"application/x-ndjson")]


def start(headers: list) -> dict:
    return {"type": "http.response.start", "status": 200, "headers": list(headers)}


def part(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Answer:
    """One replica's scripted answer: its batches, then `error` raised (None: it ends)."""

    def __init__(self, batches: list, error: BaseException | None = None):
        self.batches, self.error, self.cancelled = batches, error, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for b in self.batches:
            yield b
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class Replicas:
    """The replicas' handle: options() noted, remote() answers with the next script."""

    def __init__(self, *answers: Answer):
        self.answers, self.options_seen, self.bodies = list(answers), [], []

    def options(self, **kw):
        self.options_seen.append(kw)
        return self

    def remote(self, scope: dict, body: bytes) -> Answer:
        self.bodies.append(body)
        return self.answers.pop(0)


def call(front: SlmkitFront, body: bytes, headers: list | None = None, path: str = "/v1/chat/completions") -> list:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(body)).encode()),
                                                                        *(headers or [])]}
    sent: list[dict] = []
    given = False

    async def receive() -> dict:
        nonlocal given
        if given:
            await asyncio.sleep(3600)
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(m: dict) -> None:
        sent.append(m)

    asyncio.run(front.asgi(scope, receive, send))
    return sent


CHAT = json.dumps({"model": "phi", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


def test_a_replica_lost_before_its_answer_began_is_tried_again():
    first = Answer([[start(SSE)]], ActorDiedError())  # its start held back: nothing went out
    second = Answer([[start(SSE), part(b"data: {}\n\n")], [part(b"data: [DONE]\n\n", more=False)]])
    replicas = Replicas(first, second)
    sent = call(SlmkitFront(replicas, ["phi"], {}), CHAT)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert (ATTEMPTS_HEADER.encode(), b"2") in sent[0]["headers"]
    assert b"".join(m["body"] for m in sent[1:]) == b"data: {}\n\ndata: [DONE]\n\n"
    assert replicas.bodies == [CHAT, CHAT]
    routing = replicas.options_seen[0]
    assert routing["multiplexed_model_id"] == "phi" and routing["stream"] is True
    assert routing["session_id"] == prefix_key("phi", json.loads(CHAT))


def test_a_session_header_is_the_routing_key():
    replicas = Replicas(Answer([[start(SSE), part(b"", more=False)]]))
    call(SlmkitFront(replicas, ["phi"], {}), CHAT, headers=[(b"x-session-id", b"abc")])
    assert replicas.options_seen[0]["session_id"] == "session:abc"


@pytest.mark.parametrize("headers", [SSE, NDJSON])
def test_a_replica_lost_mid_stream_ends_it_with_the_protocols_error_event(headers):
    answer = Answer([[start(headers), part(b"data: {}\n\n")]], ActorDiedError())
    sent = call(SlmkitFront(Replicas(answer), ["phi"], {}), CHAT)
    last = sent[-1]
    assert last["type"] == "http.response.body" and last["more_body"] is False
    if headers is SSE:
        assert last["body"].startswith(b"data: ") and last["body"].endswith(b"\n\n")
        error = json.loads(last["body"][6:])["error"]
        assert error["type"] == "server_error" and "replica serving this request stopped" in error["message"]
    else:
        assert "replica serving this request stopped" in json.loads(last["body"])["error"]


def test_every_try_lost_is_a_503_and_a_replicas_own_failure_is_not_retried():
    lost = Replicas(*(Answer([], ActorDiedError()) for _ in range(3)))
    sent = call(SlmkitFront(lost, ["phi"], {}), CHAT)
    assert sent[0]["status"] == 503 and len(lost.bodies) == 3
    assert json.loads(sent[1]["body"])["error"]["code"] == "engine_dead"
    broken = Replicas(Answer([], ValueError("bug")), Answer([]))
    sent = call(SlmkitFront(broken, ["phi"], {}), CHAT)
    assert sent[0]["status"] == 500 and len(broken.bodies) == 1
    assert "ValueError: bug" in json.loads(sent[1]["body"])["error"]["message"]


def test_without_the_key_the_body_is_not_read_and_a_big_body_is_refused_at_the_front():
    replicas = Replicas(Answer([[start([]), part(b"{}", more=False)]]))
    call(SlmkitFront(replicas, ["phi"], {"api_key": "k"}), CHAT)
    assert replicas.bodies == [b""]  # the replica answers the 401 (its own auth), as a single server does
    keyed = Replicas(Answer([[start([]), part(b"{}", more=False)]]))
    call(SlmkitFront(keyed, ["phi"], {"api_key": "k"}), CHAT, headers=[(b"authorization", b"Bearer k")])
    assert keyed.bodies == [CHAT]
    none = Replicas()
    sent = call(SlmkitFront(none, ["phi"], {"max_body": 10}), CHAT)
    assert sent[0]["status"] == 413 and none.bodies == []


def test_the_replicas_end_streams_the_apps_messages_and_closing_it_cancels_the_app():
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    stopped = asyncio.Event()

    async def chunks():
        try:
            for i in range(1000):
                yield f"{i}\n".encode()
                await asyncio.sleep(0.001)
        finally:
            stopped.set()

    async def endpoint(request):
        assert await request.body() == b"payload"
        return StreamingResponse(chunks(), media_type="application/x-ndjson")

    app = Starlette(routes=[Route("/s", endpoint, methods=["POST"])])
    scope = {"type": "http", "method": "POST", "path": "/s", "headers": [], "query_string": b"", "root_path": ""}

    async def go() -> list:
        seen: list[dict] = []
        stream = run_asgi(app, scope, b"payload")
        async for batch in stream:
            seen += batch
            if sum(1 for m in seen if m.get("body")) >= 5:
                break
        await stream.aclose()
        await asyncio.wait_for(stopped.wait(), 5)  # the app's generator was closed: the app stopped
        return seen

    seen = asyncio.run(go())
    assert seen[0]["type"] == "http.response.start" and seen[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in seen[1:]).startswith(b"0\n1\n2\n3\n4\n")
