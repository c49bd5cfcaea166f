"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version):
request -> LLM options, results -> NDJSON lines with Ollama's timing fields (nanoseconds)."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from ..errors import InvalidRequestError
from ..options import GenerationOptions, options_from
from .openai_api import random_if_negative

VERSION = "0.12.0"  # the Ollama API level these routes follow
_OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                 "num_predict": "max_new_tokens", "stop": "stop", "repeat_penalty": "repetition_penalty",
                 "repeat_last_n": "repetition_window", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "min_p": "min_p", "typical_p": "typical_p",
                 "num_ctx": "max_length",
                 "speculative": "speculative", "num_draft": "num_draft"}  # extensions, as on the OpenAI routes
_FIELD_OF = {option: f"options.{name}" for name, option in _OPTION_NAMES.items()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def options(body: dict) -> GenerationOptions:
    """The GenerationOptions of an Ollama request body (errors name the body's field)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise InvalidRequestError("must be an object", param="options")
    out: dict[str, Any] = {}
    for name, value in opts.items():
        if name in _OPTION_NAMES and value is not None:
            out[_OPTION_NAMES[name]] = value
    random_if_negative(out)
    n = out.get("max_new_tokens")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < -2 or n == 0):
        raise InvalidRequestError(f"must be a positive integer, or -1 / -2 for no limit, got {n!r}",
                                  param="options.num_predict")
    if n in (-1, -2):  # Ollama: -1 = until the context ends, -2 = fill the context
        out["max_new_tokens"] = None
    # num_ctx (max_length): this request's context (the served slot context is the cap)
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise InvalidRequestError("must be 'json' or a JSON schema object", param="format")
    return options_from(out, {**_FIELD_OF, "json_schema": "format", "response_format": "format"})


def _as_data_url(b64: str) -> str:
    """An Ollama image as a data: URL; line breaks in the base64 are dropped, as Go's decoder does."""
    if b64.startswith("data:"):
        return b64
    if "\n" in b64 or "\r" in b64:
        b64 = b64.replace("\r", "").replace("\n", "")
    return f"data:image/png;base64,{b64}"


def images_to_parts(msg: dict, param: str = "images") -> dict:
    """Ollama's `images` (base64 strings, as its clients send them; a data: URL is taken too) as
    OpenAI image parts, placed before the text as Phi-3-vision's model card writes its prompts (a
    text-only model refuses them). The format comes from the bytes: Pillow reads the image."""
    imgs = msg.get("images")
    if imgs is not None and (not isinstance(imgs, list) or not all(isinstance(b, str) for b in imgs)):
        raise InvalidRequestError("must be a list of base64-encoded images (strings)", param=param)
    if not imgs:
        return {k: v for k, v in msg.items() if k != "images"}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": _as_data_url(b)}} for b in imgs]
    text = msg.get("content")
    if text:
        parts.append({"type": "text", "text": text})
    return {**{k: v for k, v in msg.items() if k not in ("images", "content")}, "content": parts}


def line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return "9999-12-31T23:59:59Z"


def final_fields(last: Any, t0: float, load_s: float = 0.0) -> dict:
    u, t = last.usage, last.timings
    out = {"done": True, "done_reason": last.finish_reason, "total_duration": int((time.perf_counter() - t0) * 1e9),
           "load_duration": int(load_s * 1e9), "prompt_eval_count": u.prompt_tokens,
           "prompt_eval_duration": int(t.prefill_s * 1e9), "eval_count": u.completion_tokens,
           "eval_duration": int(t.decode_s * 1e9)}
    if getattr(u, "drafted_tokens", 0):  # an extension (as in OpenAI usage): speculative decoding's counts
        out.update(drafted_tokens=u.drafted_tokens, accepted_tokens=u.accepted_tokens)
    return out


def chat_lines(chunks: Iterator[Any], model: str, t0: float, load_s: float = 0.0, tools: bool = False
               ) -> Iterator[bytes]:
    """NDJSON message chunks, then the final one with the timings. With tools, an answer that
    starts with "{" (a call) is held back and sent as message.tool_calls when it parses. A reasoning
    model's thinking goes in message.thinking."""
    last, held, holding = None, "", tools
    for c in chunks:
        last = c
        text = c.text
        if getattr(c, "reasoning", None):  # a reasoning model's <think> block, as Ollama sends it
            yield line({"model": model, "created_at": now(),
                        "message": {"role": "assistant", "content": "", "thinking": c.reasoning}, "done": False})
        if holding:
            held += text
            if not held.strip():
                continue
            if held.lstrip().startswith("{"):
                continue
            text, held, holding = held, "", False
        if text:
            yield line({"model": model, "created_at": now(), "message": {"role": "assistant", "content": text},
                        "done": False})
    assert last is not None
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    if last.tool_calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in last.tool_calls]
    elif held:
        message["content"] = held
    reason = "stop" if last.finish_reason == "tool_calls" else last.finish_reason
    yield line({"model": model, "created_at": now(), "message": message,
                **final_fields(last, t0, load_s), "done_reason": reason})


def generate_lines(chunks: Iterator[Any], model: str, t0: float, load_s: float = 0.0) -> Iterator[bytes]:
    last = None
    for c in chunks:
        last = c
        if getattr(c, "reasoning", None):
            yield line({"model": model, "created_at": now(), "response": "", "thinking": c.reasoning, "done": False})
        if c.text:
            yield line({"model": model, "created_at": now(), "response": c.text, "done": False})
    assert last is not None
    yield line({"model": model, "created_at": now(), "response": "", **final_fields(last, t0, load_s)})


def capabilities(info: dict) -> list[str]:
    """Ollama's capability names for /api/show, in its order: every model completes and may be
    given tools (slmkit constrains the call), a model that takes images adds "vision"."""
    return ["completion", "tools"] + (["vision"] if info.get("images") else [])


def model_entry(name: str, info: dict) -> dict:
    params = info.get("params", 0)
    size = f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.0f}M"
    return {"name": name, "model": name, "modified_at": now(), "size": info.get("weight_bytes", 0), "digest": "",
            "details": {"format": info.get("format", ""), "family": info.get("model_type", ""),
                        "families": [info.get("model_type", "")], "parameter_size": size,
                        "quantization_level": info.get("dtype", "")}}
