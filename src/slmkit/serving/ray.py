"""`slm serve` as a Ray Serve application: the same OpenAI and Ollama routes (server.app's FastAPI app,
as Ray Serve's FastAPI ingress), behind Ray Serve's HTTP proxy, each replica a slmkit engine
(continuous batching inside) pinned to its CPUs or GPU.

    from ray import serve
    from slmkit.serving.ray import ReplicaConfig, application

    app = application({"phi": "./Phi-3.5-mini-instruct"}, ReplicaConfig(num_replicas=2, num_cpus=8))
    serve.run(app, name="slmkit", route_prefix="/")   # or compose it into your own Ray Serve app

What Ray Serve does and what slmkit adds:
- replicas and autoscaling: Ray Serve's, from each replica's ongoing requests (queued + running rows):
  min/max replicas and a target of ongoing requests per replica; min_replicas=0 scales to zero after
  `keep_alive` seconds idle (the same keep-alive a single server unloads a model after).
- many models: every replica serves every model name it is given, loading on demand and unloading the
  least recently used idle one beyond `max_loaded` (server.registry's LRU; the CLI computes it from the
  memory planner and --replica-memory). Loads and unloads show in the replica's /metrics.
- conversation affinity: SessionAffinityRouter sends every request with the same `x-session-id` header
  to the same replica (rendezvous hashing over the live replicas, so a replica's death only moves its
  own sessions), the one holding that conversation's prompt cache; without the header, or when that
  replica refuses (queue full), the least loaded of two random replicas (Ray's default).
- every answer says which replica served it: the `x-slmkit-replica` header.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import BackendUnavailableError

REPLICA_HEADER = "x-slmkit-replica"
SESSION_HEADER = "x-session-id"  # Ray Serve's own session header (RAY_SERVE_SESSION_ID_HEADER_KEY)


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
    keep_alive idle seconds). num_cpus / num_gpus: what Ray reserves (pins) for each replica."""

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 16
    affinity: bool = True
    server: dict[str, Any] = field(default_factory=dict)  # create_app's keyword arguments (api_key, max_queue, ...)
    load: dict[str, Any] = field(default_factory=dict)  # model_loader's (dtype, quant, slots, slot_context, ...)


class SlmkitReplica:
    """One replica: server.app's FastAPI app over the models (name -> path), built on the replica."""

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
        ray_board.install(self.slmkit_app, rid, context.app_name)

        @self.slmkit_app.middleware("http")  # outermost: a 401 or an error answer names its replica too
        async def name_replica(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = rid
            return response

    def __serve_build_asgi_app__(self) -> Any:
        return self.slmkit_app

    def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine stopped is restarted."""
        for e in self.slmkit_app.state.registry.entries.values():
            if (why := e.engine_dead) is not None:
                raise RuntimeError(f"model {e.name!r}: engine stopped ({why})")


def rendezvous(key: str, replica_ids: list[str]) -> str:
    """The replica a key belongs to: highest hash of (key, replica) — stable while that replica lives,
    and a replica's death moves only its own keys."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest())


def application(models: dict[str, str], config: ReplicaConfig | None = None, *, name: str = "slmkit") -> Any:
    """The Ray Serve application (a bound deployment) serving models (API name -> path or spec)."""
    serve = require_ray()
    c = config or ReplicaConfig()
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
    deployment = serve.deployment(**options)(serve.ingress()(SlmkitReplica))
    return deployment.bind(models, c.server, c.load)
