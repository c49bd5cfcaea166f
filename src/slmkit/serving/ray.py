"""`slm serve` as a Ray Serve application: the same OpenAI and Ollama routes (server.app's FastAPI app)
behind Ray Serve's HTTP proxy, each replica a slmkit engine (continuous batching inside) pinned to its
CPUs or GPU.

    from ray import serve
    from slmkit.serving.ray import ReplicaConfig, application

    app = application({"phi": "./Phi-3.5-mini-instruct"}, ReplicaConfig(num_replicas=2, num_cpus=8))
    serve.run(app, name="slmkit", route_prefix="/")   # or compose it into your own Ray Serve app

Two deployments: the front (serving.ray_front; Ray's proxy sends every request there, a thin ASGI
ingress with no model) and the model replicas, which run server.app's app per request and stream its
answer back through a DeploymentHandle. What Ray Serve does and what slmkit adds:
- replicas and autoscaling: Ray Serve's, from each replica's ongoing requests (queued + running rows):
  min/max replicas and a target of ongoing requests per replica; min_replicas=0 scales to zero after
  `keep_alive` seconds idle (the same keep-alive a single server unloads a model after).
- many models: Ray Serve's model multiplexing. The front passes the model a request names (its body's
  `model`, else Ray's `serve_multiplexed_model_id` header) as the multiplexed model id, so Ray routes
  it to a replica holding that model; every replica can load every model, and keeps at most
  `max_loaded` (the registry's LRU; the CLI computes it from the memory planner and --replica-memory).
  A replica reports the models it holds through serve.multiplexed; Ray's eviction of one unloads it
  from the registry (now, or when its last request ends). Loads and unloads show in /metrics.
- conversation affinity: SessionAffinityRouter sends every request with the same key to the same
  replica among those holding its model (rendezvous hashing over the live replicas, so a replica's
  death only moves its own keys): the `x-session-id` header, else the conversation's start (its
  messages up to the first user turn, or the first characters of a prompt), so a continued
  conversation finds its prompt cache; when that replica refuses (queue full), or there is no key,
  the less loaded of two random replicas (Ray's default).
- faults: a replica that dies before any of an answer went out has the request tried on another;
  after that the stream ends with the protocol's error event (never a truncated success).
- every answer says which replica served it and on which try: `x-slmkit-replica`, `x-slmkit-attempts`.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import BackendUnavailableError

REPLICA_HEADER = "x-slmkit-replica"
ATTEMPTS_HEADER = "x-slmkit-attempts"
SESSION_HEADER = "x-session-id"  # Ray Serve's own session header (RAY_SERVE_SESSION_ID_HEADER_KEY)


class NameReplica:
    """Plain ASGI middleware: every answer's headers name the replica that gave it (no per-request
    task or memory stream in a streamed answer's way, as Starlette's BaseHTTPMiddleware would put)."""

    def __init__(self, app: Any, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def require_ray() -> Any:
    """ray.serve, or BackendUnavailableError naming the extra to install."""
    try:
        from ray import serve
    except ImportError as e:
        raise BackendUnavailableError("ray", f"serving on Ray needs Ray Serve, not importable here ({e})",
                                      extra="ray") from e
    return serve


@dataclass
class ReplicaConfig:
    """How the deployment scales. num_replicas: a fixed count; autoscaling instead when max_replicas is
    set (min_replicas..max_replicas, target_ongoing_requests each; 0 min = scale to zero after
    keep_alive idle seconds). num_cpus / num_gpus: what Ray reserves (pins) for each replica.
    fronts: replicas of the front deployment (no model, no CPU reserved)."""

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 16
    affinity: bool = True
    fronts: int = 1
    server: dict[str, Any] = field(default_factory=dict)  # create_app's keyword arguments (api_key, max_queue, ...)
    load: dict[str, Any] = field(default_factory=dict)  # model_loader's (dtype, quant, slots, slot_context, ...)


class Held:
    """What Ray's model multiplexer keeps for a model a replica holds: its eviction (Ray's LRU, with the
    registry's max_loaded as its size) unloads the model from the registry, now or when its last
    request ends. Ray calls __del__ on eviction; Python may call it again: once is enough."""

    def __init__(self, registry: Any, name: str):
        self.registry, self.name, self.released = registry, name, False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            try:
                self.registry.unload(self.name)
            except Exception:  # noqa: BLE001 -- a registry closing down: nothing to unload
                pass


class SlmkitReplica:
    """One replica: server.app's FastAPI app over the models (name -> path), built on the replica, run
    on each request the front forwards (answer)."""

    def __init__(self, models: dict[str, str], server: dict[str, Any], load: dict[str, Any]):
        from ray import serve

        from ..server.app import create_app
        from ..server.loader import model_loader
        from ..server.registry import ModelSpec
        from . import ray_board

        context = serve.get_replica_context()
        rid = context.replica_id.unique_id
        slots = max(1, int(load.get("slots", 4)))
        specs = {n: ModelSpec(model_loader(n, p, where=f" on replica {rid}", **load), slots=slots)
                 for n, p in models.items()}
        self.replica_id = rid
        self.slmkit_app = create_app(specs, **server)
        self.registry = self.slmkit_app.state.registry
        ray_board.install(self.slmkit_app, rid, context.app_name)

        # outermost: a 401 or an error answer names its replica too
        self.slmkit_app.add_middleware(NameReplica, replica=rid)

        registry = self.registry

        async def hold(model_id: str) -> Held:
            return Held(registry, model_id)

        self._hold = serve.multiplexed(max_num_models_per_replica=registry.max_loaded or -1)(hold)
        self._reporting = asyncio.get_running_loop().create_task(self._report_loaded())

    async def _report_loaded(self) -> None:
        """The models loaded at start, told to Ray's multiplexer (least recently used first)."""
        for e in sorted(self.registry.loaded(), key=lambda e: e.last_used):
            await self._hold(e.name)

    async def answer(self, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
        """The app's answer to a request the front forwards: its ASGI messages, streamed."""
        from ray import serve

        from .ray_front import run_asgi

        model = serve.get_multiplexed_model_id()
        if model in self.registry.entries:
            await self._hold(model)  # Ray's multiplexer sees it held (and evicts past the budget)
        async for batch in run_asgi(self.slmkit_app, scope, body):
            yield batch

    def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine stopped is restarted."""
        for e in self.registry.entries.values():
            if (why := e.engine_dead) is not None:
                raise RuntimeError(f"model {e.name!r}: engine stopped ({why})")

    def __del__(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close()


def rendezvous(key: str, replica_ids: list[str]) -> str:
    """The replica a key belongs to: highest hash of (key, replica) — stable while that replica lives,
    and a replica's death moves only its own keys."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest())


def _replica_options(c: ReplicaConfig, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {"name": name, "ray_actor_options": {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus},
                               "max_ongoing_requests": c.max_ongoing_requests}
    if c.max_replicas is not None:
        keep_alive = c.server.get("keep_alive")
        options["autoscaling_config"] = {
            "min_replicas": c.min_replicas, "max_replicas": c.max_replicas,
            "target_ongoing_requests": c.target_ongoing_requests,
            **({"downscale_delay_s": float(keep_alive)} if keep_alive is not None else {}),
            **({"downscale_to_zero_delay_s": float(keep_alive)} if keep_alive is not None and c.min_replicas == 0
               else {})}
    else:
        options["num_replicas"] = c.num_replicas
    if c.affinity:
        from ray.serve.config import RequestRouterConfig

        router = "slmkit.serving.ray_router.SessionAffinityRouter"  # by name: Ray imports it where it routes
        # Ray takes the class or its import path; its annotation says class only (cast: with or without ray's stubs)
        options["request_router_config"] = RequestRouterConfig(request_router_class=cast(Any, router))
    return options


def application(models: dict[str, str], config: ReplicaConfig | None = None, *, name: str = "slmkit") -> Any:
    """The Ray Serve application serving models (API name -> path or spec): the front deployment
    (`{name}-front`, the ingress) bound to the model replicas' deployment (`name`)."""
    serve = require_ray()
    from .ray_front import SlmkitFront

    c = config or ReplicaConfig()
    replicas = serve.deployment(**_replica_options(c, name))(SlmkitReplica).bind(models, c.server, c.load)
    front = serve.deployment(name=f"{name}-front", num_replicas=c.fronts, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=4096)(serve.ingress()(SlmkitFront))
    return front.bind(replicas, list(models), c.server)
