"""Embeddings on the wire: OpenAI's POST /v1/embeddings, Ollama's POST /api/embed and its legacy
POST /api/embeddings. Each body becomes an EmbedRequest (errors name the body's field); every
route runs it through the same LLM.embedding_rows + LLM.embed (one padded batch path), and
answers in its API's shape."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from .body import flag

_FORMATS = ("float", "base64")


@dataclass
class EmbedRequest:
    inputs: Any  # what LLM.embedding_rows takes; None: Ollama's load-only request (no input)
    param: str  # the body's field holding the inputs ("input", or "prompt" on /api/embeddings)
    truncate: bool = False  # cut an input longer than the context instead of refusing it
    base64: bool = False  # OpenAI encoding_format "base64": little-endian float32 bytes
    dimensions: int | None = None  # refused unless it equals the model's hidden size
    started: float = field(default_factory=time.perf_counter)


def _dimensions(body: dict) -> int | None:
    d = body.get("dimensions")
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise InvalidRequestError(f"must be a positive integer, got {d!r}", param="dimensions")
    return d


def parse_openai(body: dict) -> EmbedRequest:
    """input: a string, a list of strings, a list of token ids or a list of token-id lists
    (LLM.embedding_rows checks each); encoding_format float / base64; dimensions; user."""
    if body.get("input") is None:
        raise InvalidRequestError("is required: a string, a list of strings or token ids", param="input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in _FORMATS:
        raise InvalidRequestError(f"must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):  # an end-user id for abuse tracking: no effect here
        raise InvalidRequestError("must be a string", param="user")
    return EmbedRequest(body["input"], "input", base64=fmt == "base64", dimensions=_dimensions(body))


def _no_options(body: dict) -> None:
    """Ollama's `options` tune generation; none of them changes an embedding, so any given is
    refused by name rather than ignored."""
    opts = body.get("options")
    if opts is None or opts == {}:
        return
    if not isinstance(opts, dict):
        raise InvalidRequestError("must be an object", param="options")
    raise InvalidRequestError("does not apply to embeddings", param=f"options.{next(iter(opts))}")


def parse_ollama(body: dict) -> EmbedRequest:
    """/api/embed: input (a string or a list of strings; absent or empty: load the model only),
    truncate (default true: cut to the context), dimensions."""
    _no_options(body)
    inputs = body.get("input")
    if inputs is not None and not isinstance(inputs, str) and not (
            isinstance(inputs, list) and all(isinstance(t, str) for t in inputs)):
        raise InvalidRequestError("must be a string or a list of strings", param="input")
    return EmbedRequest(inputs or None, "input", truncate=flag(body, "truncate", True), dimensions=_dimensions(body))


def parse_ollama_legacy(body: dict) -> EmbedRequest:
    """/api/embeddings: prompt (a string; absent or empty: load the model only)."""
    _no_options(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequestError("must be a string", param="prompt")
    return EmbedRequest(prompt or None, "prompt")


def run(llm: Any, req: EmbedRequest) -> tuple[Any, int]:
    """(float32 [n, hidden] embeddings, prompt tokens) of a request with inputs."""
    rows = llm.embedding_rows(req.inputs, truncate=req.truncate, param=req.param)
    vectors = llm.embed(rows)
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise InvalidRequestError(f"this model's embeddings have {vectors.shape[1]} dimensions; other sizes are not "
                                  "supported", param="dimensions")
    return vectors, sum(map(len, rows))


def openai_response(vectors: Any, tokens: int, model: str, req: EmbedRequest) -> dict:
    def encode(v: Any) -> Any:
        if req.base64:
            return base64.b64encode(np.ascontiguousarray(v.numpy(), dtype="<f4").tobytes()).decode("ascii")
        return v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def ollama_response(vectors: Any, tokens: int, model: str, req: EmbedRequest, load_s: float) -> dict:
    return {"model": model, "embeddings": vectors.tolist() if len(vectors) else [],
            "total_duration": int((time.perf_counter() - req.started) * 1e9),
            "load_duration": int(load_s * 1e9), "prompt_eval_count": tokens}
