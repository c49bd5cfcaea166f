"""`ollama+http://host:11434/NAME` (or ollama+https://...): a running Ollama (or anything speaking its
API, `slm serve` included) through the official `ollama` client. Text-level (capabilities.token_ids
False): messages in, text out; Ollama tokenizes, templates and samples.

What is mapped (capabilities.options lists exactly these): max_new_tokens -> num_predict, max_length
-> num_ctx, temperature, top_k, top_p, min_p, typical_p, seed, stop, repetition_penalty ->
repeat_penalty, repetition_window -> repeat_last_n, presence_penalty, frequency_penalty, and
json_schema / response_format -> format (a schema, or "json"). Options left at their defaults are not
sent, so the model's own defaults (its Modelfile's) apply. Images go as the message's `images`
(base64); tools as Ollama's `tools` (tool_choice other than "auto" has no Ollama equivalent: refused).
open() options: timeout (seconds, default 300), headers (e.g. a proxy's Authorization), keep_alive.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..errors import (
    BackendUnavailableError,
    InvalidRequestError,
    ProviderError,
    ProviderUnreachableError,
    UnsupportedByBackendError,
)
from ..options import GenerationOptions
from .base import BackendStats, Capabilities, ModelDescription, TextStep

PROVIDER = "ollama+http"
# GenerationOptions field -> Ollama's option
OPTION_NAMES = {"max_new_tokens": "num_predict", "max_length": "num_ctx", "temperature": "temperature",
                "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p", "seed": "seed",
                "stop": "stop", "repetition_penalty": "repeat_penalty", "repetition_window": "repeat_last_n",
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
MAPPED = frozenset(OPTION_NAMES) | {"json_schema", "response_format"}


def ollama_options(o: GenerationOptions) -> dict[str, Any]:
    """Ollama's `options` for o: the options set to other than their defaults, and num_predict always
    (-1 for no limit) since our default length is ours, not the model's."""
    changed = set(o.changed())
    out: dict[str, Any] = {"num_predict": -1 if o.max_new_tokens is None else o.max_new_tokens}
    for name, theirs in OPTION_NAMES.items():
        if name != "max_new_tokens" and name in changed and getattr(o, name) is not None:
            value = getattr(o, name)
            out[theirs] = list(value) if name == "stop" else value
    return out


def ollama_format(o: GenerationOptions) -> Any:
    """Ollama's `format`: a JSON schema, "json", or None."""
    if o.json_schema is not None:
        schema = o.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"is not valid JSON ({e})", param="json_schema") from None
        return schema
    rf = o.response_format
    if rf is None or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return "json"
    if rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict) and "schema" in rf["json_schema"]:
        return rf["json_schema"]["schema"]
    raise UnsupportedByBackendError("response_format", PROVIDER, f"type {rf.get('type')!r}")


def _image_b64(url: str, index: int) -> str:
    from ..vision.images import MAX_IMAGE_BYTES, load_image, read_image_bytes

    data = read_image_bytes(url, index=index, max_bytes=MAX_IMAGE_BYTES)
    load_image(data, index=index)  # a real image, within the limits, before it is sent
    return base64.b64encode(data).decode()


def ollama_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped (normalized) messages as Ollama's: text joined, image parts as base64 `images`,
    assistant tool_calls with object arguments, tool results as role "tool"."""
    out, n_images = [], 0
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"]}
        content = m.get("content")
        if isinstance(content, list):
            texts, images = [], []
            for part in content:
                if part.get("type") == "image_url":
                    images.append(_image_b64(part["image_url"]["url"], n_images))
                    n_images += 1
                else:
                    texts.append(part.get("text") or "")
            msg["content"] = "".join(texts)
            if images:
                msg["images"] = images
        else:
            msg["content"] = content or ""
        if m.get("tool_calls"):
            msg["tool_calls"] = [_tool_call_out(c) for c in m["tool_calls"]]
        if m.get("name") and m["role"] == "tool":
            msg["tool_name"] = m["name"]
        out.append(msg)
    return out


def _tool_call_out(call: Any) -> dict[str, Any]:
    fn = call.get("function", {}) if isinstance(call, Mapping) else {"name": call.name, "arguments": call.arguments}
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise InvalidRequestError("a tool call's arguments must be a JSON object", param="messages") from None
    return {"function": {"name": fn.get("name"), "arguments": args}}


class OllamaHTTPBackend:
    """A model served by a running Ollama."""
    vocab_size = 0
    tokenizer = None

    def __init__(self, client: Any, host: str, model: str, show: Mapping[str, Any], *,
                 keep_alive: float | str | None = None, provider: str = PROVIDER):
        self.client, self.host, self.name, self.provider = client, host, model, provider
        self.keep_alive = keep_alive
        info = dict(show.get("model_info") or {})
        self.model_type = str(info.get("general.architecture") or (show.get("details") or {}).get("family") or "")
        ctx = info.get("context_length") or info.get(f"{self.model_type}.context_length")
        self.context_length = int(ctx) if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else 0
        caps = show.get("capabilities")
        caps = set(caps) if isinstance(caps, list) else {"completion"}
        self.capabilities = Capabilities(images="vision" in caps, tools="tools" in caps, token_ids=False,
                                         completion="completion" in caps, structured_output=True, options=MAPPED,
                                         backend=provider)
        self.tokens_generated = 0

    def _common(self, options: GenerationOptions) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.name, "options": ollama_options(options), "stream": True}
        fmt = ollama_format(options)
        if fmt is not None:
            kw["format"] = fmt
        if self.keep_alive is not None:
            kw["keep_alive"] = self.keep_alive
        return kw

    def stream_chat(self, messages: Sequence[Any], options: GenerationOptions, *, tools: Any = None,
                    tool_choice: Any = None, num_crops: int | None = None) -> Iterator[TextStep]:
        if num_crops is not None:
            raise UnsupportedByBackendError("num_crops", self.provider, "the server's processor decides")
        if tool_choice not in (None, "auto"):
            raise UnsupportedByBackendError("tool_choice", self.provider, "Ollama has no tool_choice; use 'auto'")
        kw = self._common(options)
        if tools is not None:
            kw["tools"] = list(tools)
        msgs = ollama_messages(messages)
        return self._steps(lambda: self.client.chat(messages=msgs, **kw), "message")

    def stream_completion(self, prompt: str, options: GenerationOptions) -> Iterator[TextStep]:
        kw = self._common(options)
        return self._steps(lambda: self.client.generate(prompt=prompt, raw=True, **kw), "response")

    def _steps(self, call: Any, field: str) -> Iterator[TextStep]:
        stream = _translated(call, self.provider)
        try:
            for part in stream:
                text = (part.message.content or "") if field == "message" else (part.response or "")
                if not part.done:
                    if text:
                        yield TextStep(text)
                    continue
                calls = _tool_calls(part) if field == "message" else None
                completion = part.eval_count
                self.tokens_generated += completion or 0
                reason = "tool_calls" if calls else ("length" if part.done_reason == "length" else "stop")
                yield TextStep(text, reason, part.prompt_eval_count, completion, tool_calls=calls)
                return
            raise ProviderError(self.provider, "the stream ended without its final (done) message")
        finally:
            stream.close()

    def describe(self) -> ModelDescription:
        return ModelDescription(model_type=self.model_type, context_length=self.context_length, format="ollama")

    def stats(self) -> BackendStats:
        return BackendStats(self.tokens_generated, request_context=self.context_length)

    def close(self) -> None:
        inner = getattr(self.client, "_client", None)
        if inner is not None:
            inner.close()


def _tool_calls(part: Any) -> list[Any] | None:
    from ..tools import ToolCall

    calls = getattr(part.message, "tool_calls", None)
    if not calls:
        return None
    return [ToolCall(f"call_{uuid.uuid4().hex[:24]}", c.function.name, dict(c.function.arguments or {}))
            for c in calls]


def _translated(call: Any, provider: str) -> Generator[Any, None, None]:
    """The client's stream, its failures as ProviderError / ProviderUnreachableError."""
    import httpx
    import ollama

    try:
        yield from call()
    except ollama.ResponseError as e:
        raise ProviderError(provider, str(e.error), status=e.status_code if e.status_code > 0 else None) from None
    except (ConnectionError, httpx.TransportError) as e:
        raise ProviderUnreachableError(provider, f"no answer from {provider} ({type(e).__name__}: {e})") from None


def split_target(target: str) -> tuple[str, str]:
    """("http://host:port", "NAME") of "http://host:port/NAME"."""
    u = urlsplit(target)
    name = u.path.strip("/")
    if u.scheme not in ("http", "https") or not u.netloc or not name:
        raise InvalidRequestError(f"{target!r}: expected ollama+http://HOST:PORT/MODEL (e.g. "
                                  "ollama+http://localhost:11434/phi3.5)", param="model")
    return f"{u.scheme}://{u.netloc}", name


def open(provider: str, target: str, *, timeout: float = 300.0, headers: Mapping[str, str] | None = None,  # noqa: A001
         keep_alive: float | str | None = None, dtype: str = "auto", device: str = "cpu",
         **options: Any) -> OllamaHTTPBackend:
    try:
        import ollama
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs the ollama client ({e})", extra="ollama") from None
    if options:
        name = next(iter(options))
        raise InvalidRequestError(f"unknown option {name!r} for the {provider} backend (it takes timeout, headers, "
                                  "keep_alive)", param=name)
    for name, value, default in (("dtype", dtype, "auto"), ("device", device, "cpu")):
        if value != default:
            raise UnsupportedByBackendError(name, provider, "the Ollama server decides")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidRequestError(f"must be a positive number of seconds, got {timeout!r}", param="timeout")
    host, model = split_target(target)
    client = ollama.Client(host=host, timeout=timeout, headers=dict(headers or {}))
    show = next(_translated(lambda: iter([client.show(model)]), provider))
    return OllamaHTTPBackend(client, host, model, show.model_dump(by_alias=True), keep_alive=keep_alive,
                             provider=provider)
