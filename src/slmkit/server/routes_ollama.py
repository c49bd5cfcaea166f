"""Ollama's routes: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version (the
wire format is in ollama_api.py, the request parsing in requests.py)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from module globals

from ..errors import InvalidRequestError
from . import ollama_api, schemas
from .common import Runner
from .requests import Parsed, Parser


def router(parser: Parser, runner: Runner) -> APIRouter:
    r = APIRouter()
    registry = runner.registry

    async def reply(p: Parsed, lines: Any, field: str) -> Any:
        if p.stream:
            return await runner.streamed(p.model, p.keep_alive, lines, "application/x-ndjson")
        parts = [json.loads(b) for b in await runner.lines(p.model, p.keep_alive, lines)]
        final = parts[-1]
        if field == "message":
            final["message"]["content"] = "".join(x["message"]["content"] for x in parts)
        else:
            final["response"] = "".join(x["response"] for x in parts)
        return final

    async def load_or_unload(p: Parsed, field: str) -> dict:
        """Ollama: a request with no prompt / messages loads the model; with keep_alive 0 it unloads it."""
        name, keep = p.model, p.keep_alive
        empty = {"message": {"role": "assistant", "content": ""}} if field == "message" else {"response": ""}
        if keep == 0:
            if not await asyncio.to_thread(registry.unload, name):
                raise InvalidRequestError(f"model {name!r} was loaded by the program that serves it and cannot be "
                                          "unloaded", param="keep_alive")
            return {"model": name, "created_at": ollama_api.now(), **empty, "done": True, "done_reason": "unload"}
        await runner.once(name, keep, lambda llm: None)  # acquire and release on a worker: loads it if needed
        return {"model": name, "created_at": ollama_api.now(), **empty, "done": True, "done_reason": "load"}

    @r.post("/api/chat", openapi_extra=schemas.body(schemas.OLLAMA_CHAT))
    async def ollama_chat(request: Request) -> Any:
        p = await parser.ollama_chat(request)
        if p.load_only:
            return await load_or_unload(p, "message")
        messages, kw, opts = p.messages, p.tools, p.options
        return await reply(p, lambda llm, load_s: ollama_api.chat_lines(
            llm.chat(messages, stream=True, options=opts, **kw), p.model, p.started, load_s, tools=bool(kw)), "message")

    @r.post("/api/generate", openapi_extra=schemas.body(schemas.OLLAMA_GENERATE))
    async def ollama_generate(request: Request) -> Any:
        p = await parser.ollama_generate(request)
        if p.load_only:
            return await load_or_unload(p, "response")
        prompt, system, user, opts = p.prompt, p.system, p.messages, p.options

        def make(llm: Any) -> Any:
            if p.raw or llm.prompt_style == "completion":
                if user[0]["content"] != prompt:
                    raise InvalidRequestError("images need a chat model (not raw completion)", param="images")
                return llm.generate((system + "\n" if system else "") + prompt, opts, stream=True)
            return llm.chat(([{"role": "system", "content": system}] if system else []) + user, stream=True,
                            options=opts)

        return await reply(p, lambda llm, load_s: ollama_api.generate_lines(
            make(llm), p.model, p.started, load_s), "response")

    def entry_json(e: Any) -> dict:
        return ollama_api.model_entry(e.name, e.info)

    @r.get("/api/tags")
    async def tags() -> dict:
        return {"models": [entry_json(e) for e in registry.entries.values()]}

    @r.get("/api/ps")
    async def ps() -> dict:
        out = []
        for e in registry.loaded():
            expires = "9999-12-31T23:59:59Z" if e.expires_at is None or e.active else ollama_api.iso(e.expires_at)
            size = e.info.get("weight_bytes", 0) + e.info.get("kv_bytes", 0)
            out.append({**entry_json(e), "size": size, "size_vram": 0, "expires_at": expires,
                        "context_length": e.info.get("slot_context", 0), "slots": e.slots})
        return {"models": out}

    @r.post("/api/show", openapi_extra=schemas.body(schemas.OLLAMA_SHOW))
    async def show(request: Request) -> dict:
        body = await parser.body(request)
        e = registry.entry(parser.model({"model": body.get("model") or body.get("name")}))
        entry, info = entry_json(e), e.info
        return {"modelfile": f"FROM {e.name}\n", "parameters": "", "template": info.get("template", ""),
                "details": entry["details"], "model_info": {"general.architecture": info.get("model_type", ""),
                                                            "general.parameter_count": info.get("params", 0),
                                                            "context_length": info.get("context_length", 0),
                                                            # slmkit: bytes the weights need per precision
                                                            "slmkit.ram_needed": info.get("ram_needed", {})},
                "capabilities": ollama_api.capabilities(info), "modified_at": entry["modified_at"]}

    @r.get("/api/version")
    async def version() -> dict:
        return {"version": ollama_api.VERSION}

    return r
