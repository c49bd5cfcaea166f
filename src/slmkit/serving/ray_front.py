"""Both ends of the hop between Ray Serve's HTTP proxy and the model replicas (serving.ray's doc).

The front (SlmkitFront, a thin ASGI ingress with no model; several replicas allowed) reads a
request's body within the server's limits, picks its routing (the model it names, passed as Ray's
multiplexed model id; a session or prompt-prefix key, passed as Ray's session id) and forwards it
through a streaming DeploymentHandle to a replica. The replica (run_asgi) runs the same FastAPI app
in its own process on that request and yields the app's ASGI messages back, so the routes stay in
one place, server/.

Faults: while nothing has reached the client (the response's start is held until its first body
part), a replica that dies is replaced by another try elsewhere (Ray's router drops the dead one);
after that, the stream ends with the protocol's error event (OpenAI SSE `data: {"error": ...}`,
Ollama's `{"error": ...}` line), never a truncated success. Imported where Ray runs: it needs Ray.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from starlette.datastructures import Headers

from ..errors import EngineError
from ..server import errors
from ..server.body import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY, BodyLimit, BodyTimeout, BodyTooLarge
from ..server.common import OPEN_PATHS, key_ok
from .ray import ATTEMPTS_HEADER, SESSION_HEADER

TRIES = 3  # replicas a request may be sent to while nothing of its answer has gone out
PREFIX_CHARS = 256  # of a completion prompt: its routing key (a chat's is its messages up to the first user turn)
STREAMED = ("text/event-stream", "application/x-ndjson")  # framings with an error event
_THREAD_ABOVE = 256 * 2**10  # bodies larger than this are parsed on a worker thread
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
               "headers", "client", "server")


# ---------------------------------------------------------------- routing
def prefix_key(model: str, body: dict) -> str:
    """A conversation's routing key from its start, so its next turn (which repeats the start) has the
    key of its first: a chat's messages up to and including its first user message; a completion's
    first PREFIX_CHARS characters (with Ollama's `system`), or first PREFIX_CHARS // 4 token ids.
    "" when the body has no prompt (embeddings and the like go to the least loaded replica)."""
    messages = body.get("messages")
    start: Any
    if isinstance(messages, list) and messages:
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), 0)
        start = messages[:first_user + 1]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: the first one's
        if isinstance(prompt, str) and prompt:
            start = [body.get("system") or "", prompt[:PREFIX_CHARS]]
        elif isinstance(prompt, list) and prompt:
            start = prompt[:PREFIX_CHARS // 4]
        else:
            return ""
    text = json.dumps([model, start], sort_keys=True, default=str)  # ASCII: lone surrogates cannot break it
    return "prefix:" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def served_name(names: list[str], asked: Any) -> str:
    """The served model a request names (Ollama's ":latest" tag allowed), or "" (unknown: the replica's
    404 says so; not a multiplexed model id)."""
    if not isinstance(asked, str) or not asked:
        return ""
    if asked in names:
        return asked
    base = asked.removesuffix(":latest")
    return base if base in names else ""


def _parse(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # the replica's parser answers it with a 400 naming the fault
        return {}
    return body if isinstance(body, dict) else {}


# ---------------------------------------------------------------- the replica's end
async def run_asgi(app: Any, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """The app's answer to one request, run here: its ASGI messages, in batches of what is ready at
    once. Closing the iteration (the front cancelled: its client left) tells the app the client is
    gone and cancels it."""
    out: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    given = False

    async def receive() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app({**scope, "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, out.put)
        finally:
            out.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: its response says it
    try:
        done = False
        while not done:
            batch = [await out.get()]
            while not out.empty():
                batch.append(out.get_nowait())
            done = batch[-1] is None
            items = [m for m in batch if m is not None]
            if items:
                yield items
    finally:
        gone.set()
        if not task.done():
            task.cancel()


# ---------------------------------------------------------------- the front
def replica_lost(e: BaseException) -> bool:
    """Whether a handle call failed because its replica (or its process or node) went away."""
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else e
    return isinstance(cause, (RayActorError, WorkerCrashedError, NodeDiedError))


def _media(start: dict) -> str:
    ctype = next((v for k, v in start.get("headers", []) if k.lower() == b"content-type"), b"")
    return ctype.decode("latin-1").split(";")[0].strip().lower()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class SlmkitFront:
    """The deployment Ray's proxy sends every request to: replicas is the model replicas' handle,
    names the served models, server create_app's keyword arguments (api_key, max_body, body_timeout)."""

    def __init__(self, replicas: Any, names: list[str], server: dict[str, Any]):
        self.replicas, self.names = replicas, list(names)
        self.api_key = server.get("api_key")
        self.bounded = BodyLimit(self._http, max_bytes=server.get("max_body", DEFAULT_MAX_BODY),
                             timeout_s=server.get("body_timeout", DEFAULT_BODY_TIMEOUT_S), refuse=errors.body_refused)

    def __serve_build_asgi_app__(self) -> Any:
        async def app(scope: dict, receive: Any, send: Any) -> None:  # a function: uvicorn takes it as ASGI 3
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self.bounded(scope, receive, send)

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        headers = Headers(scope=scope)
        body = b""
        if scope["path"] in OPEN_PATHS or key_ok(headers, self.api_key):  # else the headers alone: the replica's 401
            try:
                body = await _read(receive)
            except (BodyTooLarge, BodyTimeout) as e:
                await errors.response_for(e)(scope, receive, send)
                return
        parsed: dict = {}
        if body and scope["method"] == "POST":
            parsed = await asyncio.to_thread(_parse, body) if len(body) > _THREAD_ABOVE else _parse(body)
        model = (served_name(self.names, parsed.get("model"))
                 or served_name(self.names, serve.get_multiplexed_model_id()))
        session = headers.get(SESSION_HEADER)
        key = f"session:{session}" if session else prefix_key(model, parsed)
        handle = self.replicas.options(stream=True, method_name="answer", multiplexed_model_id=model, session_id=key)
        plain = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        for attempt in range(1, TRIES + 1):
            if await self._try(handle, plain, body, send, attempt):
                return
            await asyncio.sleep(0.1 * attempt)  # Ray's controller and router learn of the death meanwhile
        lost = EngineError(f"the replicas given this request stopped before answering ({TRIES} tries); "
                           "retry it in a moment", dead=True)
        await errors.response_for(lost)(scope, receive, send)

    async def _try(self, handle: Any, scope: dict, body: bytes, send: Any, attempt: int) -> bool:
        """One replica's answer to the client: False when it died before any of it went out (another
        may try), True once the client has an answer, whole or ended by an error event."""
        gen = handle.remote(scope, body)
        held: list[dict] = []  # the response's start, until its first body part: a retry is safe until then
        media, sent, ended, finished = "", False, False, False
        try:
            async for batch in gen:
                for m in batch:
                    if m["type"] == "http.response.start":
                        m = {**m, "headers": [*m.get("headers", []), (ATTEMPTS_HEADER.encode(), str(attempt).encode())]}
                        media = _media(m)
                        held.append(m)
                        continue
                    for h in held:
                        await send(h)
                    held, sent = [], True
                    await send(m)
                    ended = ended or m["type"] == "http.response.body" and not m.get("more_body", False)
            finished = True
            for h in held:  # a start with no body part (a replica's app never does this)
                await send(h)
            if not sent and not held:  # the app answered nothing at all
                await errors.response_for(EngineError("the replica gave no answer"))(scope, _no_receive, send)
            return True
        except Exception as e:  # noqa: BLE001 -- the replica's failure, told to the client in the protocol's terms
            finished = True
            if ended:  # the answer was whole before the replica went
                return True
            lost = replica_lost(e)
            if not sent and lost:
                return False
            why = (EngineError(f"the replica serving this request stopped ({type(e).__name__}); retry it", dead=True)
                   if lost else EngineError(f"the replica failed: {type(e).__name__}: {e}"))
            if not sent:
                await errors.response_for(why)(scope, _no_receive, send)
            elif media in STREAMED:
                await send({"type": "http.response.body", "body": errors.in_stream(why, media), "more_body": False})
            else:
                raise  # a plain body cut short: the connection drops (a client sees it incomplete, never whole)
            return True
        finally:
            if not finished:  # cancelled (the client left): the replica stops too
                gen.cancel()


async def _read(receive: Any) -> bytes:
    """The request's body (BodyLimit's receive raises past the size or time limit)."""
    parts, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
