"""`slm serve`: one FastAPI app with OpenAI- and Ollama-compatible routes over loaded models.

    app = create_app({"phi3": slmkit.load("./Phi-3.5-mini-instruct")}, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

The house, by role: requests.py parses every body (the one place), routes_openai.py /
routes_ollama.py / routes_embed.py (embeddings, both APIs; wire format in embed_api.py) /
routes_service.py hold the routes, common.py the API-key check and running work
on a model's Scheduler (scheduler.py; models in registry.py), errors.py the one mapping from an
exception to a response (OpenAI-shaped {"error": {message, type, param, code}} on every route,
retry-after on 503, an error event mid-stream). Bodies are bounded (body.py: size 413, arrival
time 408, JSON depth and valid Unicode 400) before a route reads them; every POST route's body
schema is in the OpenAPI document (schemas.py).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .. import __version__
from . import errors, images, routes_embed, routes_ollama, routes_openai, routes_service
from .body import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY, BodyLimit
from .common import Runner, install_auth
from .registry import Registry
from .requests import Parser


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

    # inside auth (added first), so a BodyTooLarge raised while a route reads reaches the app's
    # handler as itself, not wrapped in the auth middleware's task group
    app.add_middleware(BodyLimit, max_bytes=max_body, timeout_s=body_timeout, refuse=errors.body_refused)
    install_auth(app, api_key)
    # outermost last: CORS answers a browser's preflight before auth, and puts its headers on every
    # answer (a 401 or 413 too, which a cross-origin page can then read)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    errors.install(app)

    parser, runner = Parser(registry, fetch_policy), Runner(registry)
    app.include_router(routes_openai.router(parser, runner))
    app.include_router(routes_ollama.router(parser, runner))
    app.include_router(routes_embed.router(parser, runner))
    app.include_router(routes_service.router(registry))
    return app
