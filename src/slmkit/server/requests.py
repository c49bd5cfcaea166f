"""The one place a request body becomes what a route needs: the model's name, the messages or
prompts (image parts decoded and checked), keep_alive, the stream flags, and the generation
options (openai_api.options / ollama_api.options). Each check names the field at fault, in the
order the fields are read, so a body with several faults always gets the same answer."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..api import check_images
from ..errors import InvalidRequestError, UnsupportedInputError
from . import images, ollama_api, openai_api
from .body import flag, parse_json_off_loop
from .registry import Registry, parse_keep_alive

Prompt = str | list[int]  # a text, or token ids given as they are


@dataclass
class Parsed:
    model: str
    keep_alive: Any  # "default", or seconds (None: forever)
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    options: Any = None  # generate() / chat() options
    messages: Any = None  # chat: checked, image parts decoded
    prompts: list[Prompt] = field(default_factory=list)  # /v1/completions: one choice set each
    prompt: str = ""  # /api/generate
    tools: dict = field(default_factory=dict)  # chat()'s tools / tool_choice keywords, when given
    vision: dict = field(default_factory=dict)  # chat()'s num_crops keyword, when given
    system: str | None = None  # /api/generate
    raw: bool = False  # /api/generate: no chat template
    load_only: bool = False  # Ollama: no prompt or messages, so load (or, keep_alive 0, unload) the model
    started: float = field(default_factory=time.perf_counter)


def completion_prompts(value: Any) -> list[Prompt]:
    """/v1/completions' prompt in every form the OpenAI API reference allows: a string, a list of
    strings, a list of token ids, or a list of token-id lists (each given to the model as it is;
    the model checks the ids against its vocabulary)."""
    what = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(what if not isinstance(value, list) else "must not be empty", param="prompt")
    if all(isinstance(p, str) for p in value):
        empty = next((i for i, p in enumerate(value) if not p), None)
        if empty is not None and len(value) > 1:  # (a lone "" the model refuses, as for a string)
            raise InvalidRequestError(f"prompt {empty} is empty", param="prompt")
        return list(value)
    if all(_is_id(t) for t in value):
        return [list(value)]
    if all(isinstance(p, list) for p in value):
        for i, p in enumerate(value):
            if not p:
                raise InvalidRequestError(f"prompt {i} has no token ids", param="prompt")
            bad = next((t for t in p if not _is_id(t)), None)
            if bad is not None:
                raise InvalidRequestError(f"token ids must be non-negative integers, got {bad!r} in prompt {i}",
                                          param="prompt")
        return [list(p) for p in value]
    raise InvalidRequestError(what, param="prompt")


def check_token_ids(llm: Any, prompts: list[Prompt]) -> None:
    """Every token-id prompt inside the model's vocabulary, checked before any prompt runs: a bad
    later prompt is a 400, not an error in the middle of a stream."""
    vocab = llm.backend.vocab_size
    for i, p in enumerate(prompts):
        bad = next((t for t in p if t >= vocab), None) if isinstance(p, list) else None
        if bad is not None:
            raise InvalidRequestError(f"token ids must be integers in the vocabulary [0, {vocab}), got {bad} "
                                      f"in prompt {i}", param="prompt")


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Parser:
    def __init__(self, registry: Registry, fetch_policy: images.FetchPolicy):
        self.registry, self.fetch_policy = registry, fetch_policy

    async def body(self, request: Request) -> dict:
        return await parse_json_off_loop(await request.body())

    def model(self, body: dict, key: str = "model") -> str:
        name = body.get(key)
        if name is not None and not isinstance(name, str):
            raise InvalidRequestError(f"must be a string, got {type(name).__name__}", param="model")
        return self.registry.entry(name).name

    async def _start(self, request: Request) -> tuple[dict, Parsed]:
        body = await self.body(request)
        name = self.model(body)
        keep = "default" if body.get("keep_alive") is None else parse_keep_alive(body["keep_alive"])
        return body, Parsed(name, keep)

    async def _images_checked(self, name: str, messages: Any, param: str = "messages",
                              names: images.PartNames | None = None) -> Any:
        """Image parts decoded and checked, but only for a model that takes images: a text-only
        one refuses them (naming `param`) before anything is fetched. names(i, j): the field an
        error about part j of message i names (default: its OpenAI path)."""
        if images.has_images(messages):
            check_images(name, self.registry.entry(name).info.get("images"), param=param)
        return await images.resolve(messages, self.fetch_policy, names)

    @staticmethod
    def _openai_stream(body: dict, p: Parsed) -> None:
        p.stream = flag(body, "stream")
        if p.stream:
            so = body.get("stream_options")
            if so is not None and not isinstance(so, dict):
                raise InvalidRequestError("must be an object like {\"include_usage\": true}", param="stream_options")
            p.include_usage = bool((so or {}).get("include_usage"))

    async def openai_chat(self, request: Request) -> Parsed:
        body, p = await self._start(request)
        p.messages = await self._images_checked(p.model, body.get("messages"))
        p.options = openai_api.options(body)
        if body.get("num_crops") is not None:  # an extension field (extra_body): crops per image
            p.vision = {"num_crops": openai_api.num_crops(body)}
            if self.registry.entry(p.model).info.get("images") is False:
                raise UnsupportedInputError(f"model {p.model!r} is text-only: num_crops applies to images",
                                            param="num_crops")
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        if tools is not None or tool_choice is not None:
            p.tools = {"tools": tools, "tool_choice": tool_choice}
        self._openai_stream(body, p)
        return p

    async def openai_completion(self, request: Request) -> Parsed:
        body, p = await self._start(request)
        p.prompts = completion_prompts(body.get("prompt"))
        p.options = openai_api.options(body)
        self._openai_stream(body, p)
        return p

    async def embeddings(self, request: Request, parse: Callable[[dict], Any]) -> tuple[Parsed, Any]:
        """An embeddings body: the model and keep_alive, and parse(body) (server/embed_api.py) for the rest."""
        body, p = await self._start(request)
        return p, parse(body)

    async def ollama_chat(self, request: Request) -> Parsed:
        body, p = await self._start(request)
        msgs = body.get("messages")
        if msgs is None or msgs == []:
            p.load_only = True
            return p
        if not isinstance(msgs, list):
            raise InvalidRequestError("must be a list of messages", param="messages")
        msgs = [ollama_api.images_to_parts(m, f"messages[{i}].images") if isinstance(m, dict) else m
                for i, m in enumerate(msgs)]
        first = next((i for i, m in enumerate(msgs) if images.has_images([m])), 0)
        p.messages = await self._images_checked(p.model, msgs, f"messages[{first}].images",
                                                lambda i, j: f"messages[{i}].images[{j}]")
        p.options, p.started = ollama_api.options(body), time.perf_counter()
        tools = body.get("tools")
        p.tools = {"tools": tools} if tools else {}  # the ollama client sends [] for none
        p.stream = flag(body, "stream", True)
        return p

    async def ollama_generate(self, request: Request) -> Parsed:
        body, p = await self._start(request)
        p.prompt, p.options, p.started = body.get("prompt") or "", ollama_api.options(body), time.perf_counter()
        if not isinstance(p.prompt, str):
            raise InvalidRequestError("must be a string", param="prompt")
        if not p.prompt:  # Ollama: an empty prompt just loads (or, with keep_alive 0, unloads) the model
            p.load_only = True
            return p
        p.system = body.get("system")
        if p.system is not None and not isinstance(p.system, str):
            raise InvalidRequestError("must be a string", param="system")
        p.messages = await self._images_checked(p.model, [ollama_api.images_to_parts(
            {"role": "user", "content": p.prompt, "images": body.get("images")}, "images")], "images",
            lambda i, j: f"images[{j}]")
        p.raw = flag(body, "raw")
        p.stream = flag(body, "stream", True)
        return p
