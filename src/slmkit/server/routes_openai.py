"""OpenAI's routes: /v1/models, /v1/chat/completions, /v1/completions (the wire format is in
openai_api.py, the request parsing in requests.py)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from module globals

from . import ollama_api, openai_api, schemas
from .common import Runner
from .requests import Parser, check_token_ids


def model_card(e: Any) -> dict:
    """OpenAI's model object, with Ollama's capability names as an extra field ("vision" for a model
    that takes images; the chat page reads it)."""
    return {"id": e.name, "object": "model", "created": 0, "owned_by": "slmkit",
            "capabilities": ollama_api.capabilities(e.info)}


def router(parser: Parser, runner: Runner) -> APIRouter:
    r = APIRouter()
    registry, capped = runner.registry, openai_api.capped

    @r.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(e) for e in registry.entries.values()]}

    @r.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return model_card(registry.entry(name))

    @r.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT_COMPLETIONS))
    async def chat_completions(request: Request) -> Any:
        p = await parser.openai_chat(request)
        name, messages, kw, opts = p.model, p.messages, {**p.tools, **p.vision}, p.options
        if p.stream:
            return await runner.streamed(name, p.keep_alive, lambda llm, _: openai_api.chat_stream(
                llm, messages, kw, capped(llm, opts), name, p.include_usage))
        out = await runner.once(name, p.keep_alive, lambda llm: llm.chat(messages, options=capped(llm, opts), **kw))
        return openai_api.chat_completion(out if isinstance(out, list) else [out], name)

    @r.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETIONS))
    async def completions(request: Request) -> Any:
        p = await parser.openai_completion(request)
        name, prompts, opts = p.model, p.prompts, p.options
        if p.stream:
            def events(llm: Any, load_s: float) -> Any:
                check_token_ids(llm, prompts)
                return openai_api.completion_stream(llm, prompts, capped(llm, opts), name, p.include_usage)

            return await runner.streamed(name, p.keep_alive, events)

        def make(llm: Any) -> list[list[Any]]:  # each prompt's choices
            check_token_ids(llm, prompts)
            outs = [llm.generate(prompt, capped(llm, opts)) for prompt in prompts]
            return [out if isinstance(out, list) else [out] for out in outs]

        return openai_api.text_completion(await runner.once(name, p.keep_alive, make), name)

    return r
