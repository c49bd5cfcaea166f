"""The service's own routes: /health, /metrics (Prometheus text) and the chat page at /."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .registry import Registry

_METRIC_TYPES = [
    "# TYPE slmkit_requests_total counter", "# TYPE slmkit_queue_depth gauge", "# TYPE slmkit_running gauge",
    "# TYPE slmkit_model_loaded gauge", "# TYPE slmkit_model_loads_total counter",
    "# TYPE slmkit_model_unloads_total counter",
    "# TYPE slmkit_generated_tokens_total counter", "# TYPE slmkit_prompt_cache_tokens_total counter",
    "# TYPE slmkit_batch_size gauge", "# TYPE slmkit_batch_steps_total counter", "# TYPE slmkit_kv_slots_used gauge",
    "# TYPE slmkit_kv_bytes gauge", "# TYPE slmkit_expert_hits_total counter"]


def metrics_text(registry: Registry) -> str:
    lines = list(_METRIC_TYPES)
    for n, e in registry.entries.items():
        sch, lab = e.scheduler, f'{{model="{n}"}}'
        lines += [f"slmkit_requests_total{lab} {sch.served}", f"slmkit_queue_depth{lab} {sch.queue_depth}",
                  f"slmkit_running{lab} {sch.running}", f"slmkit_model_loaded{lab} {int(e.loaded)}",
                  f"slmkit_model_loads_total{lab} {e.loads}", f"slmkit_model_unloads_total{lab} {e.unloads}",
                  f"slmkit_generated_tokens_total{lab} {e.tokens_generated}",
                  f"slmkit_prompt_cache_tokens_total{lab} {e.reused_tokens}"]
        llm = e.llm  # once: an unload may clear it meanwhile
        st = llm.stats() if llm is not None else None
        if st is not None and st.batching:
            lines += [f"slmkit_batch_size{lab} {st.batch_size}", f"slmkit_batch_steps_total{lab} {st.batch_steps}",
                      f"slmkit_kv_slots_used{lab} {st.kv_slots_used}", f"slmkit_kv_bytes{lab} {st.kv_bytes}"]
        for layer, row in enumerate(st.expert_hits if st is not None else ()):  # a mixture-of-experts model
            lines += [f'slmkit_expert_hits_total{{model="{n}",layer="{layer}",expert="{e}"}} {c}'
                      for e, c in enumerate(row)]
    return "\n".join(lines) + "\n"


def health_body(registry: Registry) -> dict[str, Any]:
    """/health's answer: status "unhealthy" (a 503) when a model's engine stopped."""
    es = registry.entries.values()
    body = {"status": "ok", "models": list(registry.entries), "loaded": [e.name for e in registry.loaded()],
            "queue_depth": sum(e.scheduler.queue_depth for e in es), "running": sum(e.scheduler.running for e in es)}
    dead = {e.name: why for e in es if (why := e.engine_dead) is not None}
    if dead:  # a model whose engine stopped fails every request: not healthy, whatever else runs
        body.update(status="unhealthy", dead_engines=dead)
    return body


def router(registry: Registry) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> Any:
        body = health_body(registry)
        return JSONResponse(body, status_code=503) if body["status"] != "ok" else body

    @r.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(registry), media_type="text/plain; version=0.0.4")

    @r.get("/api/catalog")
    async def catalog() -> Any:
        """The model catalog's names (slmkit.sources.catalog) and whether this server serves each: the
        chat page lists the others as `slm serve NAME` hints (it never loads or pulls one itself)."""
        from ..sources.catalog import entries

        served = set(registry.entries)
        return {"models": [{"name": e.name, "title": e.title, "parameters": e.params, "context": e.context,
                            "modalities": list(e.modalities), "served": e.name in served}
                           for e in entries().values()]}

    @r.get("/")
    async def chat_page() -> Response:
        """A small web chat over /v1/chat/completions (streams; the API key, if any, is typed in)."""
        page = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html")

    return r
