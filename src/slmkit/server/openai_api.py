"""OpenAI wire format (../shared/specs/cloud-endpoints.md §A6): requests -> LLM options, results ->
chat.completion / chat.completion.chunk / text_completion JSON."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidRequestError

# request fields -> generate() options (extra_body fields arrive at the top level too; unknown
# fields are ignored, as the checklist advises for a toolkit server)
_SAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
         "typical_p", "repetition_penalty", "min_tokens", "response_format", "top_logprobs")


def _typed(body: dict, name: str, kinds: tuple, what: str) -> Any:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds)):
        raise InvalidRequestError(f"must be {what}, got {type(v).__name__}", param=name)
    return v


def options(body: dict) -> dict[str, Any]:
    """generate()/chat() keyword options for an OpenAI request body."""
    out: dict[str, Any] = {}
    for name in _SAME:
        if body.get(name) is not None:
            out["min_new_tokens" if name == "min_tokens" else name] = body[name]
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise InvalidRequestError(f"must be a positive integer, got {mt!r}", param="max_tokens")
        out["max_new_tokens"] = mt
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list) and len(stop) > 4:
            raise InvalidRequestError("at most 4 stop sequences", param="stop")
        out["stop"] = stop
    if body.get("logit_bias") is not None:
        lb = _typed(body, "logit_bias", (dict,), "an object of token id strings to numbers")
        out["logit_bias"] = lb
    if _typed(body, "logprobs", (bool,), "a boolean"):
        out["logprobs"] = True
    elif body.get("top_logprobs"):
        raise InvalidRequestError("needs logprobs: true", param="top_logprobs")
    n = body.get("n")
    if n is not None and n != 1:
        out["n"] = n
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _logprobs_json(lps: Any) -> dict | None:
    if lps is None:
        return None

    def entry(lp: Any) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}

    return {"content": [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top_logprobs]} for lp in lps]}


def usage_json(results: list[Any]) -> dict:
    p = results[0].usage.prompt_tokens
    c = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_completion(results: list[Any], model: str) -> dict:
    choices = []
    for i, r in enumerate(results):
        msg: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
        if r.tool_calls:
            msg["content"] = None
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments_json}} for c in r.tool_calls]
        choices.append({"index": i, "message": msg, "logprobs": _logprobs_json(r.logprobs),
                        "finish_reason": r.finish_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "slmkit", "choices": choices, "usage": usage_json(results)}


def text_completion(results: list[Any], model: str) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "slmkit",
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": usage_json(results)}


def sse(obj: Any) -> bytes:
    """One SSE event: `data: <one-line JSON>` and a blank line, "\\n" only, no comments (the strict
    azure-ai-inference parser accepts exactly this)."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


def chat_chunks(chunks: Iterator[Any], model: str, include_usage: bool) -> Iterator[bytes]:
    """GenerationChunks -> chat.completion.chunk SSE events, then [DONE]."""
    cid, created = new_id("chatcmpl"), int(time.time())

    def event(delta: dict, finish: str | None = None, logprobs: Any = None) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "slmkit",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    yield event({"role": "assistant", "content": ""})
    last = None
    for c in chunks:
        if c.text or c.logprobs:
            yield event({"content": c.text}, logprobs=_logprobs_json(c.logprobs))
        last = c
    assert last is not None
    yield event({}, last.finish_reason)
    if include_usage:
        p, n = last.usage.prompt_tokens, last.usage.completion_tokens
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "slmkit", "choices": [],
                   "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}})
    yield sse(b"[DONE]")


def chat_result_chunks(results: list[Any], model: str, include_usage: bool) -> Iterator[bytes]:
    """Finished results (n > 1, or with tools) as a chat.completion.chunk stream: per choice a role
    delta, its content or its tool-call deltas, then its finish reason; usage; [DONE]."""
    cid, created = new_id("chatcmpl"), int(time.time())

    def event(i: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "slmkit",
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    for i, r in enumerate(results):
        yield event(i, {"role": "assistant", "content": ""})
        if r.tool_calls:
            yield event(i, {"tool_calls": [{"index": j, "id": c.id, "type": "function",
                                            "function": {"name": c.name, "arguments": c.arguments_json}}
                                           for j, c in enumerate(r.tool_calls)]})
        elif r.text:
            yield event(i, {"content": r.text}, logprobs=_logprobs_json(r.logprobs))
        yield event(i, {}, r.finish_reason)
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "slmkit", "choices": [], "usage": usage_json(results)})
    yield sse(b"[DONE]")


def completion_chunks(chunks: Iterator[Any], model: str, include_usage: bool) -> Iterator[bytes]:
    cid, created = new_id("cmpl"), int(time.time())
    last = None
    for c in chunks:
        last = c
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}]})
    if include_usage and last is not None:
        p, n = last.usage.prompt_tokens, last.usage.completion_tokens
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}})
    yield sse(b"[DONE]")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
