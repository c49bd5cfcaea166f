"""The embeddings routes: OpenAI's /v1/embeddings, Ollama's /api/embed and legacy /api/embeddings,
all through one path (embed_api.run: LLM.embedding_rows, then LLM.embed's padded batches) on the
model's scheduler."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from module globals

from . import embed_api, schemas
from .common import Runner
from .requests import Parser


def router(parser: Parser, runner: Runner) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/embeddings", openapi_extra=schemas.body(schemas.EMBEDDINGS))
    async def embeddings(request: Request) -> dict:
        p, req = await parser.embeddings(request, embed_api.parse_openai)
        vectors, tokens = await runner.once(p.model, p.keep_alive, lambda llm: embed_api.run(llm, req))
        return embed_api.openai_response(vectors, tokens, p.model, req)

    async def ollama(request: Request, parse: Any) -> tuple[Any, Any, Any, int, float]:
        p, req = await parser.embeddings(request, parse)

        def make(llm: Any, load_s: float) -> Any:
            if req.inputs is None:  # Ollama: no input loads the model and answers with no vectors
                return iter([([], 0, load_s)])
            return iter([(*embed_api.run(llm, req), load_s)])

        ((vectors, tokens, load_s),) = await runner.lines(p.model, p.keep_alive, make)
        return p, req, vectors, tokens, load_s

    @r.post("/api/embed", openapi_extra=schemas.body(schemas.OLLAMA_EMBED))
    async def ollama_embed(request: Request) -> dict:
        p, req, vectors, tokens, load_s = await ollama(request, embed_api.parse_ollama)
        return embed_api.ollama_response(vectors, tokens, p.model, req, load_s)

    @r.post("/api/embeddings", openapi_extra=schemas.body(schemas.OLLAMA_EMBEDDINGS))
    async def ollama_embeddings(request: Request) -> dict:
        _, _, vectors, _, _ = await ollama(request, embed_api.parse_ollama_legacy)
        return {"embedding": vectors[0].tolist() if len(vectors) else []}

    return r
