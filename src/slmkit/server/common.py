"""What every route group shares: the API-key check, and running a request's work on its model's
scheduler (the model held, loaded first if needed, until the work ends) with its answer whole or
streamed."""
from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import anyio
from fastapi import Request  # FastAPI reads the handlers' annotations from module globals
from fastapi.responses import StreamingResponse

from . import errors
from .registry import Registry

OPEN_PATHS = ("/health", "/")  # the page itself asks for the key


def key_ok(headers: Any, api_key: str | None) -> bool:
    """Whether request headers carry the key (a bearer token or an api-key header); True without a key."""
    if not api_key:
        return True
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else headers.get("api-key", "")
    return hmac.compare_digest(token.encode(), api_key.encode())


def install_auth(app: Any, api_key: str | None) -> None:
    """401 for a request without the key (a bearer token or an api-key header), when there is one."""
    app.add_middleware(Auth, api_key=api_key)


class Auth:
    """The API-key check as plain ASGI middleware. Starlette's BaseHTTPMiddleware (app.middleware)
    would run every route in a task of its own and pass a streamed answer through a memory stream:
    one more hand-off per chunk, and one more place for a client's disconnect to get lost."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.api_key:
            request = Request(scope)
            if request.url.path not in OPEN_PATHS and not key_ok(request.headers, self.api_key):
                refused = errors.error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Runner:
    """Runs work for a model on the registry's scheduler of that model."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def using(self, name: str, keep_alive: Any, make: Callable[[Any, float], Iterator[Any]]) -> Any:
        """work for the model's scheduler: make(llm, load_s) -> an iterator, with the model held
        (loaded first if needed) until the iterator ends or is closed."""
        registry = self.registry

        def work(cancelled: Any) -> Any:
            llm, load_s = registry.acquire(name)
            serial = registry.entry(name).serial if not llm.stats().batching else None
            try:
                if serial is None:  # continuous batching: the workers share the engine's steps
                    yield from make(llm, load_s)
                else:  # one request at a time on this model
                    with serial:
                        yield from make(llm, load_s)
            finally:
                registry.release(name, keep_alive)
        return work

    async def run(self, name: str, work: Any) -> list[Any]:
        return [item async for item in self.registry.entry(name).scheduler.stream(work)]

    async def once(self, name: str, keep_alive: Any, make: Callable[[Any], Any]) -> Any:
        """make(llm) on one of the model's workers: one result."""
        (out,) = await self.run(name, self.using(name, keep_alive, lambda llm, load_s: iter([make(llm)])))
        return out

    async def lines(self, name: str, keep_alive: Any, make: Callable[[Any, float], Iterator[Any]]) -> list[Any]:
        """Every item of make(llm, load_s), run on a worker, once all are in."""
        return await self.run(name, self.using(name, keep_alive, make))

    async def streamed(self, name: str, keep_alive: Any, make: Callable[[Any, float], Iterator[bytes]],
                       media: str = "text/event-stream") -> StreamingResponse:
        """make(llm, load_s) -> an iterator of encoded events, run on a worker, streamed as it comes."""
        agen = self.registry.entry(name).scheduler.stream(self.using(name, keep_alive, make))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if media == "text/event-stream" else None
        return ClosingStream(await _first_then(agen, media), media_type=media, headers=headers)


class ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its chunks' generator however the response ends. Starlette
    cancels the streaming task when the client goes; if that lands while a chunk is being sent (not
    while the next one is awaited), the generator stays suspended at its yield, and its `finally`,
    which cancels the job on the worker, would run only once the garbage collector found it: the
    worker generated the whole answer for nobody meanwhile."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # closing must finish even in a cancelled task
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _first_then(agen: AsyncGenerator[bytes, None], media: str) -> AsyncGenerator[bytes, None]:
    """Surface errors raised before the first chunk as a normal error response (not mid-stream)."""
    first = await agen.__anext__()

    async def rest() -> AsyncGenerator[bytes, None]:
        yield first
        try:
            async for b in agen:
                yield b
        except Exception as e:  # noqa: BLE001 -- mid-stream: an error event in the stream's framing, then close
            yield errors.in_stream(e, media)
        finally:
            await agen.aclose()  # cancels the job now (see ClosingStream)

    return rest()
