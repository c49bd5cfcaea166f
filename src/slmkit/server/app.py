"""`slm serve`: one FastAPI app with OpenAI- and Ollama-compatible routes over loaded models.

    app = create_app({"phi3": slmkit.load("./Phi-3.5-mini-instruct")}, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Requests go through the Scheduler (server/scheduler.py). Errors are OpenAI-shaped
({"error": {message, type, param, code}}) on every route, with retry-after on 503. Bodies are
bounded (server/body.py: size 413, arrival time 408, JSON depth and valid Unicode 400) before a
route reads them; every POST route's body schema is in the OpenAPI document (server/schemas.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request  # FastAPI reads the handlers' annotations from module globals
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import ContextLengthError, EngineError, InvalidRequestError, SlmkitError, UnsupportedInputError
from . import images, ollama_api, openai_api, schemas
from .body import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY, BodyLimit, BodyTimeout, BodyTooLarge, flag,
                   parse_json_off_loop)
from .registry import ModelUnavailable, Registry, UnknownModel, parse_keep_alive
from .scheduler import QueueFull


def create_app(models: dict[str, Any], *, api_key: str | None = None, max_queue: int = 64,
               cors_origins: list[str] | None = None, workers: int | None = None,
               keep_alive: float | None = None, max_loaded: int | None = None,
               image_urls: bool | list[str] = False, max_body: int = DEFAULT_MAX_BODY,
               body_timeout: float = DEFAULT_BODY_TIMEOUT_S) -> Any:
    """models: name -> a loaded LLM (stays loaded) or a registry.ModelSpec (loaded now, unloaded
    after keep_alive idle seconds, None = never, and reloaded on demand). workers: requests at
    once for a loaded LLM (default: its batch slots, else 1). image_urls: fetch http(s) image
    URLs (True, or a list of allowed hosts); data: URLs always work. max_body: bytes a request
    body may have (413 beyond); body_timeout: seconds between two pieces of a body (408 beyond)."""
    registry = Registry(models, keep_alive=keep_alive, max_loaded=max_loaded, max_queue=max_queue, workers=workers)
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        registry.close()

    app = FastAPI(title="slmkit", version=__version__, lifespan=lifespan)
    app.state.registry = registry
    fetch_policy = app.state.image_policy = images.FetchPolicy(allow=image_urls)

    def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        if len(message) > 2000:  # a message quoting a huge value need not send it back whole
            message = message[:2000] + "..."
        return JSONResponse(openai_api.error_body(message, type_, param, code), status_code=status, headers=headers)

    def body_refused(status: int, message: str) -> JSONResponse:
        """413 / 408 for a body: the connection closes after it (the rest of the body is not read)."""
        code = "request_too_large" if status == 413 else "request_timeout"
        return error(status, message, "invalid_request_error", "body", code, headers={"connection": "close"})

    # inside auth (added first), so a BodyTooLarge raised while a route reads reaches the app's
    # handler as itself, not wrapped in the auth middleware's task group
    app.add_middleware(BodyLimit, max_bytes=max_body, timeout_s=body_timeout, refuse=body_refused)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path not in ("/health", "/"):  # the page itself asks for the key
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("api-key", "")
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)

    # outermost last: CORS answers a browser's preflight before auth, and puts its headers on every
    # answer (a 401 or 413 too, which a cross-origin page can then read)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    async def body_of(request: Request) -> dict:
        return await parse_json_off_loop(await request.body())

    def model_of(body: dict) -> str:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise InvalidRequestError(f"must be a string, got {type(name).__name__}", param="model")
        return registry.entry(name).name

    def include_usage(body: dict) -> bool:
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise InvalidRequestError("must be an object like {\"include_usage\": true}", param="stream_options")
        return bool((so or {}).get("include_usage"))

    async def images_checked(name: str, messages: Any) -> Any:
        """Image parts decoded and checked, but only for a model that takes images: a text-only
        one refuses them before anything is fetched."""
        if images.has_images(messages) and registry.entry(name).info.get("images") is False:
            raise UnsupportedInputError(f"model {name!r} is text-only and cannot take image parts",
                                        param="messages")
        return await images.resolve(messages, fetch_policy)

    def keep_alive_of(body: dict) -> Any:
        return "default" if body.get("keep_alive") is None else parse_keep_alive(body["keep_alive"])

    def using(name: str, keep_alive: Any, make: Any) -> Any:
        """work for the model's scheduler: make(llm, load_s) -> an iterator, with the model held
        (loaded first if needed) until the iterator ends or is closed."""
        def work(cancelled: Any) -> Any:
            llm, load_s = registry.acquire(name)
            serial = registry.entry(name).serial if getattr(llm.backend, "batch", None) is None else None
            try:
                if serial is None:  # continuous batching: the workers share the engine's steps
                    yield from make(llm, load_s)
                else:  # one request at a time on this model
                    with serial:
                        yield from make(llm, load_s)
            finally:
                registry.release(name, keep_alive)
        return work

    @app.exception_handler(SlmkitError)
    async def slmkit_error(request: Request, e: SlmkitError) -> JSONResponse:
        param = getattr(e, "param", None) or getattr(e, "field", None)
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return error(400, str(e), "invalid_request_error", param, code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return body_refused(413, str(e))

    @app.exception_handler(BodyTimeout)
    async def too_slow(request: Request, e: BodyTimeout) -> JSONResponse:
        return body_refused(408, str(e))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=400)  # the client left while sending its body: nobody reads this

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, e: UnknownModel) -> JSONResponse:
        return error(404, f"model {e.args[0]!r} is not served here (served: {', '.join(registry.entries)})",
                     "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(ModelUnavailable)
    async def unavailable(request: Request, e: ModelUnavailable) -> JSONResponse:
        if e.busy:
            return error(503, str(e), "server_error", code="overloaded", headers={"retry-after": "2"})
        return error(500, str(e), "server_error", "model", "model_load_failed")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return error(503, f"the server is busy: {e}", "server_error", code="overloaded", headers={"retry-after": "2"})

    async def run(name: str, work: Any) -> list[Any]:
        return [item async for item in registry.entry(name).scheduler.stream(work)]

    async def once(name: str, keep_alive: Any, make: Any) -> Any:
        """make(llm) on one of the model's workers: one result."""
        (out,) = await run(name, using(name, keep_alive, lambda llm, load_s: iter([make(llm)])))
        return out

    async def streamed(name: str, keep_alive: Any, make: Any, media: str = "text/event-stream") -> Any:
        """make(llm, load_s) -> an iterator of encoded events, run on a worker, streamed as it comes."""
        agen = registry.entry(name).scheduler.stream(using(name, keep_alive, make))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if media == "text/event-stream" else None
        return StreamingResponse(await first_then(agen, media), media_type=media, headers=headers)

    async def first_then(agen: AsyncIterator[bytes], media: str) -> AsyncIterator[bytes]:
        """Surface errors raised before the first chunk as a normal error response (not mid-stream)."""
        first = await agen.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            yield first
            try:
                async for b in agen:
                    yield b
            except Exception as e:  # noqa: BLE001 -- mid-stream: an error event in the stream's framing, then close
                kind = "invalid_request_error" if isinstance(e, SlmkitError) and not isinstance(e, EngineError) else "server_error"
                if media == "text/event-stream":
                    yield openai_api.sse(openai_api.error_body(str(e), kind))
                else:  # Ollama's NDJSON: {"error": "..."} on a line
                    yield ollama_api.line({"error": str(e)})

        return rest()

    # ------------------------------------------------------------------ OpenAI
    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "slmkit"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in registry.entries]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return model_card(registry.entry(name).name)

    @app.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT_COMPLETIONS))
    async def chat_completions(request: Request) -> Any:
        body = await body_of(request)
        name, keep = model_of(body), keep_alive_of(body)
        messages = await images_checked(name, body.get("messages"))
        opts = openai_api.options(body)
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        kw = {"tools": tools, "tool_choice": tool_choice} if tools is not None or tool_choice is not None else {}
        capped = openai_api.capped
        if flag(body, "stream"):
            include = include_usage(body)
            return await streamed(name, keep, lambda llm, _: openai_api.chat_stream(
                llm, messages, kw, capped(llm, opts), name, include))
        out = await once(name, keep, lambda llm: llm.chat(messages, **kw, **capped(llm, opts)))
        return openai_api.chat_completion(out if isinstance(out, list) else [out], name)

    @app.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETIONS))
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        name, keep = model_of(body), keep_alive_of(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be a string", param="prompt")
        opts = openai_api.options(body)
        capped = openai_api.capped
        if flag(body, "stream"):
            include = include_usage(body)
            return await streamed(name, keep, lambda llm, _: openai_api.completion_stream(
                llm, prompt, capped(llm, opts), name, include))
        out = await once(name, keep, lambda llm: llm.generate(prompt, **capped(llm, opts)))
        return openai_api.text_completion(out if isinstance(out, list) else [out], name)

    # ------------------------------------------------------------------ Ollama
    async def ollama_reply(name: str, keep: Any, body: dict, lines: Any, field: str) -> Any:
        if flag(body, "stream", True):
            return await streamed(name, keep, lines, "application/x-ndjson")
        parts = [json.loads(b) for b in await run(name, using(name, keep, lines))]
        final = parts[-1]
        if field == "message":
            final["message"]["content"] = "".join(p["message"]["content"] for p in parts)
        else:
            final["response"] = "".join(p["response"] for p in parts)
        return final

    async def load_or_unload(name: str, keep: Any, field: str) -> dict:
        """Ollama: a request with no prompt / messages loads the model; with keep_alive 0 it unloads it."""
        empty = {"message": {"role": "assistant", "content": ""}} if field == "message" else {"response": ""}
        if keep == 0:
            if not await asyncio.to_thread(registry.unload, name):
                raise InvalidRequestError(f"model {name!r} was loaded by the program that serves it and cannot be "
                                          "unloaded", param="keep_alive")
            return {"model": name, "created_at": ollama_api.now(), **empty, "done": True, "done_reason": "unload"}
        await once(name, keep, lambda llm: None)  # acquire and release on a worker: loads it if needed
        return {"model": name, "created_at": ollama_api.now(), **empty, "done": True, "done_reason": "load"}

    @app.post("/api/chat", openapi_extra=schemas.body(schemas.OLLAMA_CHAT))
    async def ollama_chat(request: Request) -> Any:
        body = await body_of(request)
        name, keep = model_of(body), keep_alive_of(body)
        msgs = body.get("messages")
        if msgs is None or msgs == []:
            return await load_or_unload(name, keep, "message")
        if not isinstance(msgs, list):
            raise InvalidRequestError("must be a list of messages", param="messages")
        messages = await images_checked(name, [ollama_api.images_to_parts(m, f"messages[{i}].images")
                                                if isinstance(m, dict) else m for i, m in enumerate(msgs)])
        opts, t0 = ollama_api.options(body), time.perf_counter()
        tools = body.get("tools")
        kw = {"tools": tools} if tools else {}  # the ollama client sends [] for none
        return await ollama_reply(name, keep, body, lambda llm, load_s: ollama_api.chat_lines(
            llm.chat(messages, stream=True, **kw, **opts), name, t0, load_s, tools=bool(kw)), "message")

    @app.post("/api/generate", openapi_extra=schemas.body(schemas.OLLAMA_GENERATE))
    async def ollama_generate(request: Request) -> Any:
        body = await body_of(request)
        name, keep = model_of(body), keep_alive_of(body)
        prompt, opts, t0 = body.get("prompt") or "", ollama_api.options(body), time.perf_counter()
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be a string", param="prompt")
        if not prompt:  # Ollama: an empty prompt just loads (or, with keep_alive 0, unloads) the model
            return await load_or_unload(name, keep, "response")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError("must be a string", param="system")
        user = await images_checked(name, [ollama_api.images_to_parts({"role": "user", "content": prompt,
                                                                        "images": body.get("images")}, "images")])
        raw = flag(body, "raw")

        def make(llm: Any) -> Any:
            if raw or llm.prompt_style == "completion":
                if user[0]["content"] != prompt:
                    raise InvalidRequestError("images need a chat model (not raw completion)", param="images")
                return llm.generate((system + "\n" if system else "") + prompt, stream=True, **opts)
            return llm.chat(([{"role": "system", "content": system}] if system else []) + user, stream=True, **opts)

        return await ollama_reply(name, keep, body, lambda llm, load_s: ollama_api.generate_lines(
            make(llm), name, t0, load_s), "response")

    def entry_json(e: Any) -> dict:
        return ollama_api.model_entry(e.name, e.info)

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [entry_json(e) for e in registry.entries.values()]}

    @app.get("/api/ps")
    async def ps() -> dict:
        out = []
        for e in registry.loaded():
            expires = "9999-12-31T23:59:59Z" if e.expires_at is None or e.active else ollama_api.iso(e.expires_at)
            size = e.info.get("weight_bytes", 0) + e.info.get("kv_bytes", 0)
            out.append({**entry_json(e), "size": size, "size_vram": 0, "expires_at": expires,
                        "context_length": e.info.get("slot_context", 0)})
        return {"models": out}

    @app.post("/api/show", openapi_extra=schemas.body(schemas.OLLAMA_SHOW))
    async def show(request: Request) -> dict:
        body = await body_of(request)
        e = registry.entry(model_of({"model": body.get("model") or body.get("name")}))
        entry, info = entry_json(e), e.info
        return {"modelfile": f"FROM {e.name}\n", "parameters": "", "template": info.get("template", ""),
                "details": entry["details"], "model_info": {"general.architecture": info.get("model_type", ""),
                                                            "general.parameter_count": info.get("params", 0),
                                                            "context_length": info.get("context_length", 0)},
                "capabilities": ["completion", "tools"], "modified_at": entry["modified_at"]}

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": ollama_api.VERSION}

    # ------------------------------------------------------------------ service
    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        """The engine's fault, not the request's: a server error, 503 once the engine is dead."""
        if e.dead:
            return error(503, str(e), "server_error", code="engine_dead", headers={"retry-after": "10"})
        return error(500, str(e), "server_error", code="internal_error")

    @app.get("/health")
    async def health() -> Any:
        es = registry.entries.values()
        body = {"status": "ok", "models": list(registry.entries), "loaded": [e.name for e in registry.loaded()],
                "queue_depth": sum(e.scheduler.queue_depth for e in es), "running": sum(e.scheduler.running for e in es)}
        dead = {e.name: why for e in es if (why := e.engine_dead) is not None}
        if dead:  # a model whose engine stopped fails every request: not healthy, whatever else runs
            body.update(status="unhealthy", dead_engines=dead)
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = ["# TYPE slmkit_requests_total counter", "# TYPE slmkit_queue_depth gauge",
                 "# TYPE slmkit_running gauge", "# TYPE slmkit_model_loaded gauge", "# TYPE slmkit_model_loads_total counter",
                 "# TYPE slmkit_generated_tokens_total counter", "# TYPE slmkit_prompt_cache_tokens_total counter", "# TYPE slmkit_batch_size gauge",
                 "# TYPE slmkit_batch_steps_total counter", "# TYPE slmkit_kv_slots_used gauge",
                 "# TYPE slmkit_kv_bytes gauge"]
        for n, e in registry.entries.items():
            sch, lab = e.scheduler, f'{{model="{n}"}}'
            lines += [f"slmkit_requests_total{lab} {sch.served}", f"slmkit_queue_depth{lab} {sch.queue_depth}",
                      f"slmkit_running{lab} {sch.running}", f"slmkit_model_loaded{lab} {int(e.loaded)}",
                      f"slmkit_model_loads_total{lab} {e.loads}", f"slmkit_generated_tokens_total{lab} {e.tokens_generated}",
                      f"slmkit_prompt_cache_tokens_total{lab} {e.reused_tokens}"]
            llm = e.llm  # once: an unload may clear it meanwhile
            batch = getattr(llm.backend, "batch", None) if llm is not None else None
            if batch is not None:
                lines += [f"slmkit_batch_size{lab} {batch.active}", f"slmkit_batch_steps_total{lab} {batch.steps}",
                          f"slmkit_kv_slots_used{lab} {batch.cache.n}", f"slmkit_kv_bytes{lab} {batch.cache.nbytes}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def chat_page() -> Response:
        """A small web chat over /v1/chat/completions (streams; the API key, if any, is typed in)."""
        page = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html")

    return app
