"""`slm serve`: one FastAPI app with OpenAI- and Ollama-compatible routes over loaded models.

    app = create_app({"phi3": slmkit.load("./Phi-3.5-mini-instruct")}, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Requests go through the Scheduler (server/scheduler.py). Errors are OpenAI-shaped
({"error": {message, type, param, code}}) on every route, with retry-after on 503.
"""
from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request  # FastAPI reads the handlers' annotations from module globals
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ContextLengthError, InvalidRequestError, SlmkitError
from . import ollama_api, openai_api
from .scheduler import QueueFull, Scheduler


def create_app(models: dict[str, Any], *, api_key: str | None = None, max_queue: int = 64,
               cors_origins: list[str] | None = None, workers: int = 1) -> Any:
    """workers: requests run at once (use the models' batch slots when they batch continuously)."""
    if not models:
        raise ValueError("create_app needs at least one model")
    app = FastAPI(title="slmkit", version="0.1.0")
    sched = Scheduler(max_queue, workers)
    app.state.scheduler = sched
    default = next(iter(models))
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        return JSONResponse(openai_api.error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path not in ("/health", "/"):  # the page itself asks for the key
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("api-key", "")
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"the body is not valid JSON ({e})", param="body") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object", param="body")
        return body

    def model_of(body: dict) -> tuple[str, Any]:
        name = body.get("model") or default
        if name not in models:
            raise LookupError(name)
        return name, models[name]

    @app.exception_handler(SlmkitError)
    async def slmkit_error(request: Request, e: SlmkitError) -> JSONResponse:
        param = getattr(e, "param", None) or getattr(e, "field", None)
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return error(400, str(e), "invalid_request_error", param, code)

    @app.exception_handler(LookupError)
    async def unknown_model(request: Request, e: LookupError) -> JSONResponse:
        return error(404, f"model {e.args[0]!r} is not loaded (loaded: {', '.join(models)})",
                     "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return error(503, f"the server is busy: {e}", "server_error", code="overloaded", headers={"retry-after": "2"})

    async def run(work: Any) -> list[Any]:
        return [item async for item in sched.stream(work)]

    async def once(make: Any) -> Any:
        """make() on a worker: one result."""
        (out,) = await run(lambda cancelled: iter([make()]))
        return out

    async def streamed(make: Any, media: str = "text/event-stream") -> Any:
        """make() -> an iterator of encoded events, run on a worker and streamed as it comes."""
        agen = sched.stream(lambda cancelled: make())
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if media == "text/event-stream" else None
        return StreamingResponse(await first_then(agen), media_type=media, headers=headers)

    async def first_then(agen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Surface errors raised before the first chunk as a normal error response (not mid-stream)."""
        first = await agen.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            yield first
            try:
                async for b in agen:
                    yield b
            except SlmkitError as e:  # mid-stream: an SSE error event, then close
                yield openai_api.sse(openai_api.error_body(str(e), "invalid_request_error"))

        return rest()

    # ------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmkit"}
                                           for n in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        if name not in models:
            raise LookupError(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "slmkit"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await body_of(request)
        name, llm = model_of(body)
        messages = body.get("messages")
        opts = openai_api.options(body)
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        kw = {"tools": tools, "tool_choice": tool_choice} if tools is not None or tool_choice is not None else {}
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            if opts.get("n") or kw:  # generated whole, then sent as chunks (a tool call must parse first)
                def whole() -> Any:
                    out = llm.chat(messages, **kw, **opts)
                    return openai_api.chat_result_chunks(out if isinstance(out, list) else [out], name, include)

                return await streamed(whole)
            return await streamed(lambda: openai_api.chat_chunks(llm.chat(messages, stream=True, **opts), name,
                                                                 include))
        out = await once(lambda: llm.chat(messages, **kw, **opts))
        return openai_api.chat_completion(out if isinstance(out, list) else [out], name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        name, llm = model_of(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be a string", param="prompt")
        opts = openai_api.options(body)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return await streamed(lambda: openai_api.completion_chunks(llm.generate(prompt, stream=True, **opts),
                                                                       name, include))
        out = await once(lambda: llm.generate(prompt, **opts))
        return openai_api.text_completion(out if isinstance(out, list) else [out], name)

    # ------------------------------------------------------------------ Ollama
    @app.post("/api/chat")
    async def ollama_chat(request: Request) -> Any:
        body = await body_of(request)
        name, llm = model_of(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            raise InvalidRequestError("must be a list of messages", param="messages")
        messages = [ollama_api.images_to_parts(m) if isinstance(m, dict) else m for m in msgs]
        opts, t0 = ollama_api.options(body), time.perf_counter()
        lines = lambda: ollama_api.chat_lines(llm.chat(messages, stream=True, **opts), name, t0)  # noqa: E731
        if body.get("stream", True):
            return await streamed(lines, "application/x-ndjson")
        parts = [json.loads(b) for b in await run(lambda cancelled: lines())]
        final = parts[-1]
        final["message"]["content"] = "".join(p["message"]["content"] for p in parts)
        return final

    @app.post("/api/generate")
    async def ollama_generate(request: Request) -> Any:
        body = await body_of(request)
        name, llm = model_of(body)
        prompt, opts, t0 = body.get("prompt", ""), ollama_api.options(body), time.perf_counter()
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be a string", param="prompt")
        if not prompt:  # Ollama: an empty prompt just loads the model
            return {"model": name, "created_at": ollama_api.now(), "response": "", "done": True, "done_reason": "load"}
        if body.get("raw") or llm.prompt_style == "completion":
            text = (body.get("system") + "\n" if body.get("system") else "") + prompt
            make = lambda: llm.generate(text, stream=True, **opts)  # noqa: E731
        else:
            msgs = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + [
                ollama_api.images_to_parts({"role": "user", "content": prompt, "images": body.get("images")})]
            make = lambda: llm.chat(msgs, stream=True, **opts)  # noqa: E731
        lines = lambda: ollama_api.generate_lines(make(), name, t0)  # noqa: E731
        if body.get("stream", True):
            return await streamed(lines, "application/x-ndjson")
        parts = [json.loads(b) for b in await run(lambda cancelled: lines())]
        final = parts[-1]
        final["response"] = "".join(p["response"] for p in parts)
        return final

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [ollama_api.model_entry(n, m, 0) for n, m in models.items()]}

    @app.get("/api/ps")
    async def ps() -> dict:
        return {"models": [{**ollama_api.model_entry(n, m, 0), "expires_at": "9999-12-31T00:00:00Z", "size_vram": 0}
                           for n, m in models.items()]}

    @app.post("/api/show")
    async def show(request: Request) -> dict:
        body = await body_of(request)
        name, llm = model_of({"model": body.get("model") or body.get("name")})
        entry = ollama_api.model_entry(name, llm, 0)
        return {"modelfile": f"FROM {name}\n", "parameters": "", "template": llm.tokenizer.chat_template or "",
                "details": entry["details"], "model_info": {"general.architecture": llm.backend.model_type,
                                                            "context_length": llm.context_length},
                "capabilities": ["completion"], "modified_at": entry["modified_at"]}

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": ollama_api.VERSION}

    # ------------------------------------------------------------------ service
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(models), "queue_depth": sched.queue_depth, "running": sched.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = ["# TYPE slmkit_requests_total counter", f"slmkit_requests_total {sched.served}",
                 "# TYPE slmkit_queue_depth gauge", f"slmkit_queue_depth {sched.queue_depth}",
                 "# TYPE slmkit_running gauge", f"slmkit_running {sched.running}"]
        for n, m in models.items():
            batch = getattr(m.backend, "batch", None)
            if batch is not None:
                lines += [f'slmkit_batch_size{{model="{n}"}} {batch.active}',
                          f'slmkit_batch_steps_total{{model="{n}"}} {batch.steps}',
                          f'slmkit_kv_slots_used{{model="{n}"}} {batch.cache.n}',
                          f'slmkit_kv_bytes{{model="{n}"}} {batch.cache.nbytes}']
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def chat_page() -> Response:
        """A small web chat over /v1/chat/completions (streams; the API key, if any, is typed in)."""
        page = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html")

    return app
