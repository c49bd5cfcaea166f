"""One mapping from an exception to what the client gets: an OpenAI-shaped error response
({"error": {message, type, param, code}}, retry-after on 503) on every route, or, once a stream has
begun, an error event in that stream's framing (OpenAI's SSE or Ollama's NDJSON line)."""
from __future__ import annotations

from typing import Any

from fastapi import Request  # FastAPI reads the handlers' annotations from module globals
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ..errors import (
    ContextLengthError,
    EngineError,
    ModelNotFoundError,
    ModelUnavailableError,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitError,
    ProviderTimeoutError,
    ProviderUnreachableError,
    ServerBusyError,
    SlmkitError,
)
from . import ollama_api, openai_api
from .body import BodyTimeout, BodyTooLarge

MAX_MESSAGE = 2000  # characters: a message quoting a huge value need not send it back whole
_RETRY = {"retry-after": "2"}


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return JSONResponse(openai_api.error_body(message, type_, param, code), status_code=status, headers=headers)


def body_refused(status: int, message: str) -> JSONResponse:
    """413 / 408 for a body: the connection closes after it (the rest of the body is not read)."""
    code = "request_too_large" if status == 413 else "request_timeout"
    return error(status, message, "invalid_request_error", "body", code, headers={"connection": "close"})


def response_for(e: BaseException) -> Response:
    """The response for an exception raised before a response began."""
    if isinstance(e, BodyTooLarge):
        return body_refused(413, str(e))
    if isinstance(e, BodyTimeout):
        return body_refused(408, str(e))
    if isinstance(e, ClientDisconnect):
        return Response(status_code=400)  # the client left while sending its body: nobody reads this
    if isinstance(e, ModelNotFoundError):
        return error(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, ModelUnavailableError):
        if e.busy:
            return error(503, str(e), "server_error", code="overloaded", headers=_RETRY)
        return error(500, str(e), "server_error", "model", "model_load_failed")
    if isinstance(e, ServerBusyError):
        return error(503, f"the server is busy: {e}", "server_error", code="overloaded", headers=_RETRY)
    if isinstance(e, EngineError):  # the engine's fault, not the request's: 503 once the engine is dead
        if e.dead:
            return error(503, str(e), "server_error", code="engine_dead", headers={"retry-after": "10"})
        return error(500, str(e), "server_error", code="internal_error")
    if isinstance(e, ProviderError):  # a cloud (or other server) behind this one
        return provider_response(e)
    if isinstance(e, SlmkitError):  # the request's fault
        param = getattr(e, "param", None) or getattr(e, "field", None)
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return error(400, str(e), "invalid_request_error", param, code)
    return error(500, f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error")


def provider_response(e: ProviderError) -> JSONResponse:
    """A provider's refusal or failure: its credentials 502 (this server's configuration, not the
    client's), its rate limit 429 with its retry-after, no answer 503 (504 on a timeout), a request it
    refused (4xx) 400 with its message, anything else 502."""
    if isinstance(e, ProviderAuthError):
        return error(502, f"the upstream provider refused this server's credentials: {e}", "server_error",
                     code="upstream_auth")
    if isinstance(e, ProviderRateLimitError):
        wait = str(max(1, round(e.retry_after))) if e.retry_after is not None else "10"
        return error(429, str(e), "rate_limit_error", code="upstream_rate_limit", headers={"retry-after": wait})
    if isinstance(e, ProviderUnreachableError):
        timed_out = isinstance(e, ProviderTimeoutError)
        return error(504 if timed_out else 503, str(e), "server_error",
                     code="upstream_timeout" if timed_out else "upstream_unreachable", headers=_RETRY)
    if e.status is not None and 400 <= e.status < 500:
        return error(400, str(e), "invalid_request_error", code="upstream_rejected")
    return error(502, str(e), "server_error", code="upstream_error")


def in_stream(e: BaseException, media: str) -> bytes:
    """The error event that ends a stream already under way (its status line has gone out)."""
    kind = "invalid_request_error" if response_for(e).status_code < 500 else "server_error"
    if media == "text/event-stream":
        return openai_api.sse(openai_api.error_body(str(e), kind))
    return ollama_api.line({"error": str(e)})  # Ollama's NDJSON: {"error": "..."} on a line


def install(app: Any) -> None:
    """Every exception a route or middleware raises answers through response_for."""

    async def handle(request: Request, e: Exception) -> Response:
        return response_for(e)

    for kind in (Exception, SlmkitError, BodyTooLarge, BodyTimeout, ClientDisconnect):
        app.add_exception_handler(kind, handle)
