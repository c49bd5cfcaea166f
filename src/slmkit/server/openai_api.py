"""OpenAI wire format (https://platform.openai.com/docs/api-reference/chat): requests ->
GenerationOptions, results -> chat.completion / chat.completion.chunk / text_completion JSON."""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..checks import check_int
from ..errors import InvalidRequestError
from ..options import GenerationOptions, options_from

# request fields -> GenerationOptions (extra_body fields arrive at the top level too; unknown
# fields are ignored, as OpenAI-compatible servers such as vLLM do)
_SAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
         "typical_p", "repetition_penalty", "min_tokens", "response_format", "top_logprobs",
         "speculative", "num_draft")  # extensions: speculative "auto" / "none" / "ngram", num_draft
_FIELD_OF = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "max_length": "num_ctx"}


def _typed(body: dict, name: str, kinds: tuple, what: str) -> Any:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds)):
        raise InvalidRequestError(f"must be {what}, got {type(v).__name__}", param=name)
    return v


def options(body: dict) -> GenerationOptions:
    """The GenerationOptions of an OpenAI request body (errors name the body's field)."""
    out: dict[str, Any] = {}
    for name in _SAME:
        if body.get(name) is not None:
            out["min_new_tokens" if name == "min_tokens" else name] = body[name]
    random_if_negative(out)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
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
    if body.get("n") is not None:
        out["n"] = body["n"]
    if body.get("num_ctx") is not None:  # extra_body, as Ollama's option: this request's context
        out["max_length"] = body["num_ctx"]
    return options_from(out, _FIELD_OF)


MAX_CROPS = 64  # num_crops: as the image processor allows (Phi-3.5-vision's card uses 4 and 16)


def num_crops(body: dict) -> int:
    """The extension field num_crops (HD crops per image for a vision model; extra_body in the
    openai client), checked here so the error names it before any image is decoded."""
    return check_int(body["num_crops"], "num_crops", lo=1, hi=MAX_CROPS)


def random_if_negative(out: dict[str, Any]) -> None:
    """llama.cpp and Ollama clients send seed -1 for a random seed: no seed. Any other seed is
    checked with the other options (choice i of n uses seed + i)."""
    seed = out.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
        del out["seed"]


def capped(llm: Any, opts: GenerationOptions) -> GenerationOptions:
    """opts, with max_tokens checked against the context a request can have on this model (its
    batch slot's, or the model's): OpenAI refuses a max_tokens its model cannot hold rather than
    silently generating fewer. (A smaller num_ctx, Ollama's option, still ends the answer where
    its context is full, as Ollama does.)"""
    mt = opts.max_new_tokens
    if mt is None:
        return opts
    stats = llm.stats()
    limit = stats.request_context or llm.context_length
    what = "a request's context on this server" if stats.batching else "the model's context"
    if mt > limit:
        raise InvalidRequestError(f"is {mt}, more than the {limit} tokens of {what}", param="max_tokens")
    return opts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _logprobs_json(lps: Any) -> dict | None:
    if lps is None:
        return None

    def entry(lp: Any) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}

    return {"content": [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top_logprobs]} for lp in lps]}


def usage_json(results: list[Any], per_prompt: int | None = None) -> dict:
    """OpenAI usage of n choices (results or last chunks): the prompt once, every choice's tokens.
    With several prompts (per_prompt choices each, in order), each prompt once."""
    p = sum(r.usage.prompt_tokens for r in results[::per_prompt or len(results)])
    c = sum(r.usage.completion_tokens for r in results)
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    drafted = sum(getattr(r.usage, "drafted_tokens", 0) for r in results)
    if drafted:  # an extension: speculative decoding's proposed and kept tokens
        out.update(drafted_tokens=drafted, accepted_tokens=sum(r.usage.accepted_tokens for r in results))
    return out


def _per_choice(opts: GenerationOptions) -> list[GenerationOptions]:
    """The options of each of the request's n choices: choice i samples with seed + i, as
    LLM.generate(n=...) does."""
    seed = opts.seed
    return [opts.replace(n=1, seed=None if seed is None else seed + i) for i in range(opts.n)]


def chat_completion(results: list[Any], model: str) -> dict:
    choices = []
    for i, r in enumerate(results):
        msg: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
        if getattr(r, "reasoning", None) is not None:  # a reasoning model's <think> block (vLLM's / DeepSeek's field)
            msg["reasoning_content"] = r.reasoning
        if r.tool_calls:
            msg["content"] = None
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments_json}} for c in r.tool_calls]
        choices.append({"index": i, "message": msg, "logprobs": _logprobs_json(r.logprobs),
                        "finish_reason": r.finish_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "slmkit", "choices": choices, "usage": usage_json(results)}


def text_completion(groups: list[list[Any]], model: str) -> dict:
    """The choices of each prompt (n each), numbered as OpenAI does: prompt_index * n + i."""
    results = [r for g in groups for r in g]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "slmkit",
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": usage_json(results, len(groups[0]))}


def sse(obj: Any) -> bytes:
    """One SSE event: `data: <one-line JSON>` and a blank line, "\\n" only, no comments (the strict
    azure-ai-inference parser accepts exactly this)."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class _ToolCallDeltas:
    """Turns a tool-constrained answer's text, as it streams, into OpenAI deltas: plain content
    when the answer is text, else a tool_calls delta with the id and name as soon as the name is
    complete, then the arguments' JSON text piece by piece (the object's closing brace held back)."""

    def __init__(self, enabled: bool):
        self.mode = "wait" if enabled else "text"
        self.text = ""
        self.sent = 0  # characters of the arguments sent
        self.head_end = -1
        self.call_id = new_id("call")

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.mode == "text":
            return [{"content": piece}] if piece else []
        if self.mode == "wait":
            stripped = self.text.lstrip()
            if not stripped:
                return []
            if not stripped.startswith("{"):
                self.mode = "text"
                return [{"content": self.text}]
            self.mode = "head"
        out = []
        if self.mode == "head":
            m = _CALL_HEAD.match(self.text)
            if m is None:
                return []
            self.mode, self.head_end = "args", m.end()
            name = json.loads(f'"{m.group(1)}"')
            out.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
        args = self.text[self.head_end:].rstrip()
        safe = len(args) - 1 if args.endswith("}") else len(args)  # may be the outer object's end
        if safe > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": args[self.sent:safe]}}]})
            self.sent = safe
        return out

    def finish(self, calls: list | None) -> list[dict]:
        """The rest at the end: the arguments' tail, or the whole call if the head never matched
        (the model wrote the fields in another order), or the held-back text if there is no call."""
        if calls:
            if self.mode != "args":  # every call whole (a native format's list of calls)
                return [{"tool_calls": [{"index": j, "id": c.id, "type": "function",
                                         "function": {"name": c.name, "arguments": c.arguments_json}}]}
                        for j, c in enumerate(calls)]
            args = self.text[self.head_end:].rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args  # the outer object's brace
            return [{"tool_calls": [{"index": 0, "function": {"arguments": args[self.sent:]}}]}] \
                if len(args) > self.sent else []
        if self.mode in ("wait", "head") and self.text:
            return [{"content": self.text}]
        return []


def chat_stream(llm: Any, messages: Any, chat_kw: dict, opts: GenerationOptions, model: str, include_usage: bool
                ) -> Iterator[bytes]:
    """chat.completion.chunk SSE events token by token, for every choice (n > 1: sample i with seed +
    i, all at once under continuous batching), tool calls as deltas as they are generated; usage; [DONE].
    chat_kw: chat()'s keywords besides the options (tools, tool_choice, num_crops)."""
    per = _per_choice(opts)
    calling = chat_kw.get("tools") is not None and chat_kw.get("tool_choice") != "none"
    start = lambda o: llm.chat(messages, stream=True, options=o, **chat_kw)  # noqa: E731
    first = start(per[0])  # raises a bad request before any event
    cid, created = new_id("chatcmpl"), int(time.time())

    def event(i: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "slmkit",
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    def choice(i: int, chunks: Iterator[Any]) -> Iterator[bytes]:
        deltas = _ToolCallDeltas(calling)
        yield event(i, {"role": "assistant", "content": ""})
        last = None
        for c in chunks:
            last = c
            if getattr(c, "reasoning", None):  # cloud / text-level chunks may not carry the field
                yield event(i, {"reasoning_content": c.reasoning})
            out = deltas.feed(c.text)
            lp = _logprobs_json(c.logprobs)
            for j, d in enumerate(out):
                yield event(i, d, logprobs=lp if j == 0 and "content" in d else None)
            if not out and lp and deltas.mode != "args":
                yield event(i, {"content": ""}, logprobs=lp)
        assert last is not None
        for d in deltas.finish(last.tool_calls):
            yield event(i, d)
        yield event(i, {}, last.finish_reason)
        return last

    lasts = yield from _choices(llm, per, first, start, choice)
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "slmkit", "choices": [], "usage": usage_json(lasts)})
    yield sse(b"[DONE]")


def completion_stream(llm: Any, prompts: list[Any], opts: GenerationOptions, model: str, include_usage: bool
                      ) -> Iterator[bytes]:
    """text_completion SSE events token by token for every choice of every prompt (n > 1: as for
    chat_stream), choice i of prompt k numbered k * n + i as OpenAI does."""
    n = len(_per_choice(opts))
    per = [(prompt, o) for prompt in prompts for o in _per_choice(opts)]
    start = lambda po: llm.generate(po[0], po[1], stream=True)  # noqa: E731
    first = start(per[0])
    cid, created = new_id("cmpl"), int(time.time())

    def choice(i: int, chunks: Iterator[Any]) -> Iterator[bytes]:
        last = None
        for c in chunks:
            last = c
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}]})
        assert last is not None
        return last

    lasts = yield from _choices(llm, per, first, start, choice)
    if include_usage:
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage_json(lasts, n)})
    yield sse(b"[DONE]")


def _choices(llm: Any, per: list[Any], first: Iterator[Any], start: Any, choice: Any) -> Any:
    """Yield the events of every choice; return each choice's last chunk (for usage). With
    continuous batching all choices run at once (their tokens come from the same steps) and their
    events interleave; otherwise one choice after another."""
    if len(per) > 1 and llm.stats().batching:
        gens = [choice(0, first)] + [choice(i, start(o)) for i, o in enumerate(per) if i]
        lasts: list[Any] = [None] * len(gens)
        active = list(range(len(gens)))
        try:
            while active:
                for i in list(active):
                    try:
                        yield next(gens[i])
                    except StopIteration as done:
                        lasts[i] = done.value
                        active.remove(i)
        finally:
            for g in gens:  # a client gone: every choice's request is cancelled now
                g.close()
        return lasts
    lasts = []
    for i, o in enumerate(per):
        lasts.append((yield from choice(i, first if i == 0 else start(o))))
    return lasts


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
