"""/health and /metrics for the whole deployment: every replica posts its own to a named board actor
each second (and when asked), and whichever replica answers reads them all. A replica silent for
STALE_S is gone (dead, or scaled down). Imported on the replicas only: it needs Ray at import."""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import ray

STALE_S = 5.0
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


@ray.remote(num_cpus=0)
class Board:
    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, dict[str, Any], str]] = {}

    def put(self, replica: str, health: dict[str, Any], metrics: str) -> None:
        self.rows[replica] = (time.time(), health, metrics)

    def fresh(self) -> dict[str, tuple[dict[str, Any], str]]:
        now = time.time()
        self.rows = {r: row for r, row in self.rows.items() if now - row[0] <= STALE_S}
        return {r: (h, m) for r, (_, h, m) in self.rows.items()}


def board(app_name: str) -> Any:
    """The application's board (made by the first replica to ask; detached, so no replica's death
    takes it along; a local Ray instance's shutdown ends it)."""
    actor: Any = Board  # ray.remote's class: .options() and .remote() (mypy sees the plain class)
    return actor.options(name=f"slmkit-board-{app_name}", namespace="serve", get_if_exists=True,
                         lifetime="detached").remote()


def labelled(metrics: str, replica: str) -> list[str]:
    """A replica's samples with replica="..." added (its # TYPE lines left out)."""
    out = []
    for line in metrics.splitlines():
        m = _SAMPLE.match(line)
        if m:
            name, labels, value = m.groups()
            out.append(f'{name}{{replica="{replica}"{"," + labels if labels else ""}}} {value}')
    return out


def merged(rows: dict[str, tuple[dict[str, Any], str]]) -> tuple[dict[str, Any], str]:
    """(/health's body, /metrics' text) over the replicas: unhealthy when any is."""
    health = {"status": "ok" if all(h["status"] == "ok" for h, _ in rows.values()) else "unhealthy",
              "replicas": {r: h for r, (h, _) in sorted(rows.items())},
              "queue_depth": sum(h["queue_depth"] for h, _ in rows.values()),
              "running": sum(h["running"] for h, _ in rows.values())}
    types = next((m for _, m in rows.values()), "")
    lines = [t for t in types.splitlines() if t.startswith("# TYPE")] + ["# TYPE slmkit_replicas gauge",
                                                                        f"slmkit_replicas {len(rows)}"]
    for r, (_, m) in sorted(rows.items()):
        lines += labelled(m, r)
    return health, "\n".join(lines) + "\n"


def install(app: Any, replica: str, app_name: str) -> None:
    """/health and /metrics ahead of the app's own (the API-key middleware still runs first), and the
    task posting this replica's figures."""
    from fastapi.responses import JSONResponse, Response
    from fastapi.routing import APIRoute

    from ..server.routes_service import health_body, metrics_text

    registry, b = app.state.registry, board(app_name)

    async def post() -> None:
        await b.put.remote(replica, health_body(registry), metrics_text(registry))

    async def loop() -> None:
        while True:
            try:
                await post()
            except Exception:  # noqa: BLE001 -- the board restarting: post again next second
                pass
            await asyncio.sleep(1.0)

    app.state.board_task = asyncio.get_running_loop().create_task(loop())

    async def health() -> Any:
        await post()
        body, _ = merged(await b.fresh.remote())
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics() -> Response:
        await post()
        _, text = merged(await b.fresh.remote())
        return Response(text, media_type="text/plain; version=0.0.4")

    app.router.routes[:0] = [APIRoute("/health", health, methods=["GET"]),
                             APIRoute("/metrics", metrics, methods=["GET"])]
