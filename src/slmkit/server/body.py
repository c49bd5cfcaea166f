"""Request bodies, bounded before anything trusts them: a size limit (413) checked from
Content-Length and again while a chunked body arrives, a time limit between the pieces of a body
(408), and JSON parsed off the event loop into plain values no deeper than MAX_DEPTH whose strings
are all valid Unicode (a lone surrogate such as "\\ud800" cannot reach the tokenizer or a UTF-8
response). Each refusal names the field at fault, as OpenAI's errors do."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from ..api import check_text
from ..errors import InvalidRequestError

# A body must carry the image limits (images.py) base64-encoded: 64 MiB of images in a request are
# 85.3 MiB as base64 (one 20 MiB image, 26.7 MiB), and the rest leaves 10 MiB for the text, tools
# and schemas. A text that large is still refused before tokenizing (LLM._encode).
DEFAULT_MAX_BODY = 96 * 2**20
DEFAULT_BODY_TIMEOUT_S = 30.0  # between two pieces of one request body
MAX_DEPTH = 100  # nested arrays / objects: a JSON schema or a tool's parameters need far fewer
_THREAD_ABOVE = 64 * 2**10  # bodies larger than this are parsed on a worker thread


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"the request body is over the server's limit of {limit} bytes (slm serve --max-body)")


class BodyTimeout(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} s")


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused at once (before auth,
    routing or reading); a body sent without one is counted as it arrives and refused when it
    passes the limit (BodyTooLarge from receive(), which the app turns into a 413)."""

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY, timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 refuse: Any = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.refuse = refuse  # refuse(status, message) -> an ASGI response

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(413, str(BodyTooLarge(self.max_bytes)))(scope, receive, send)
            return
        seen, done = 0, False

        async def limited() -> dict:
            nonlocal seen, done
            if done:  # the body is in: later receive() calls wait for a disconnect, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, limited, send)


def _no_constant(name: str) -> Any:
    raise InvalidRequestError(f"{name} is not a JSON number", param="body")


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def check_value(value: Any, where: str = "") -> None:
    """Every string (key or value) valid Unicode, and nesting at most MAX_DEPTH, without
    recursion (a deep body must not exhaust the stack here either). `where` names the root."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            check_text(v, path or "body")
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:  # the error names the top-level field, the message where it got too deep
                field = path.split(".")[0].split("[")[0]
                raise InvalidRequestError(f"is nested more than {MAX_DEPTH} levels deep (at {path[:200]}...)",
                                          param=field or "body")
            if isinstance(v, dict):
                for k, item in v.items():
                    check_text(k, path or "body")  # a key: the object's path
                    stack.append((item, _path(path, k), depth + 1))
            else:
                stack.extend((item, _path(path, i), depth + 1) for i, item in enumerate(v))


def parse_json(raw: bytes) -> dict:
    """The request object of a JSON body ({} for an empty one), or InvalidRequestError(param=...)."""
    try:
        body = json.loads(raw or b"{}", parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError(f"the body is nested too deeply to parse (at most {MAX_DEPTH} levels)",
                                  param="body") from None
    except InvalidRequestError:
        raise
    except ValueError as e:  # bad JSON or UTF-8, or an integer of more digits than Python converts
        raise InvalidRequestError(f"the body is not valid JSON ({str(e)[:200]})", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object", param="body")
    check_value(body)
    return body


async def parse_json_off_loop(raw: bytes) -> dict:
    """parse_json on a worker thread for a big body, so the event loop keeps answering others."""
    if len(raw) > _THREAD_ABOVE:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def flag(body: dict, name: str, default: bool = False) -> bool:
    """A true / false field of a request (null or absent: the default)."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequestError(f"must be true or false, got {type(v).__name__}", param=name)
    return v
