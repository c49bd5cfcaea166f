"""LLM calls on a text-level backend (capabilities.token_ids False: a cloud API, a running Ollama):
messages in, text out, as the same GenerationResult / GenerationChunk types the token-level path
returns (token_ids empty: the provider's tokens are not ours). Stop strings the backend does not
take are applied here on the streamed text, so they are honoured either way."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import UnsupportedByBackendError
from .options import GenerationOptions
from .results import GenerationChunk, GenerationResult, Timings, TokenLogprob, Usage
from .streams import validated_first
from .text.stops import StopStrings


def chat(backend: Any, messages: Sequence[Any], opts: GenerationOptions, *, stream: bool, tools: Any,
         tool_choice: Any, num_crops: int | None) -> Any:
    from .text.chat import normalize_messages

    caps = backend.capabilities
    if tools is not None and not caps.tools:
        raise UnsupportedByBackendError("tools", caps.backend)
    if num_crops is not None and not caps.images:
        raise UnsupportedByBackendError("num_crops", caps.backend)
    msgs = normalize_messages(messages)
    if any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
           for m in msgs) and not caps.images:
        raise UnsupportedByBackendError("images", caps.backend, "this model takes text only")

    def run(o: GenerationOptions) -> Iterator[GenerationChunk]:
        backend_opts, client_stop = _split_stop(o, caps)
        steps = backend.stream_chat(msgs, backend_opts, tools=tools, tool_choice=tool_choice, num_crops=num_crops)
        return _chunks(steps, client_stop)

    return _results(run, opts, stream)


def complete(backend: Any, prompt: str, opts: GenerationOptions, *, stream: bool) -> Any:
    caps = backend.capabilities
    if not caps.completion:
        raise UnsupportedByBackendError("prompt", caps.backend, "it has chat only: use chat(messages)")

    def run(o: GenerationOptions) -> Iterator[GenerationChunk]:
        backend_opts, client_stop = _split_stop(o, caps)
        return _chunks(backend.stream_completion(prompt, backend_opts), client_stop)

    return _results(run, opts, stream)


def _split_stop(o: GenerationOptions, caps: Any) -> tuple[GenerationOptions, list[str]]:
    """Stop strings go to a backend that takes them; otherwise they are matched here."""
    if o.stop and caps.options is not None and "stop" not in caps.options:
        return o.replace(stop=()), list(o.stop)
    return o, []


def _results(run: Any, opts: GenerationOptions, stream: bool) -> Any:
    if opts.n == 1:
        chunks = run(opts)
        return validated_first(chunks) if stream else _collect(chunks)
    if stream:
        from .errors import InvalidRequestError

        raise InvalidRequestError("streaming returns one sequence; use n with stream=False", param="stream")
    seed = opts.seed  # n answers, one request each (sample i uses seed + i)
    return [_collect(run(opts.replace(n=1, seed=None if seed is None else seed + i))) for i in range(opts.n)]


def _chunks(steps: Iterator[Any], stop: list[str]) -> Iterator[GenerationChunk]:
    matcher = StopStrings(stop)
    t0 = time.perf_counter()
    t_first: float | None = None
    pieces, last, text, text_lp = 0, None, "", None
    try:
        for step in steps:
            last = step
            if t_first is None:
                t_first = time.perf_counter()
            text, text_lp = (matcher.feed(step.text) if stop else step.text), step.logprobs
            pieces += bool(step.text)
            if matcher.stopped or step.finish_reason is not None:
                break
            yield GenerationChunk(text, [], logprobs=text_lp)
            text, text_lp = "", None
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    t_end = time.perf_counter()
    timings = Timings((t_first or t_end) - t0, t_end - (t_first or t_end))
    if last is None:
        yield GenerationChunk("", [], "stop", Usage(0, 0), timings)
        return
    reason = "stop" if matcher.stopped else (last.finish_reason or "stop")
    if stop and not matcher.stopped:
        text += matcher.flush()
    usage = Usage(last.prompt_tokens or 0, last.completion_tokens if last.completion_tokens is not None else pieces)
    yield GenerationChunk(text, [], reason, usage, timings, text_lp, tool_calls=last.tool_calls)


def _collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    text: list[str] = []
    lps: list[TokenLogprob] = []
    last = None
    for c in chunks:
        text.append(c.text)
        if c.logprobs:
            lps.extend(c.logprobs)
        last = c
    assert last is not None and last.finish_reason is not None and last.usage is not None and last.timings is not None
    return GenerationResult("".join(text), [], last.finish_reason, last.usage, last.timings, lps or None,
                            tool_calls=last.tool_calls)
