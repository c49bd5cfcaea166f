"""`slm serve --ray [ADDRESS]`: the models served by a Ray Serve application (slmkit.serving.ray) on a
local Ray instance (no ADDRESS) or a running cluster (ray://host:10001 or auto), its HTTP proxy on
--host:--port; blocks until Ctrl-C, then shuts the application down."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def add_ray_args(srv: argparse.ArgumentParser, positive: Any) -> None:
    g = srv.add_argument_group("Ray Serve (pip install 'slmkit[ray]')")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve through Ray Serve: a local Ray instance, or the cluster at ADDRESS (auto, ray://...)")
    g.add_argument("--replicas", type=positive, default=1, help="replicas, each a slmkit engine (default 1)")
    g.add_argument("--max-replicas", type=positive, default=None,
                   help="autoscale between --min-replicas and this, from each replica's ongoing requests")
    g.add_argument("--min-replicas", type=int, default=1, help="autoscaling floor; 0 = scale to zero after "
                   "--keep-alive idle")
    g.add_argument("--target-ongoing", type=float, default=None, help="ongoing requests (queued + running rows) "
                   "per replica the autoscaler aims at (default: --slots)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves for each replica (default 0)")
    g.add_argument("--replica-memory", default=None, help="memory budget of a replica's models (e.g. 8G): "
                   "the models it keeps loaded at once follow from the memory planner; LRU beyond")
    g.add_argument("--no-affinity", action="store_true", help="route conversations (x-session-id, or the prompt's "
                   "start) like any other request")
    g.add_argument("--fronts", type=positive, default=1, help="replicas of the front deployment (no model; it "
                   "forwards each request to a model replica; default 1)")


def _max_loaded(a: argparse.Namespace, paths: dict[str, str], size: Any) -> int | None:
    """Models a replica keeps loaded: the --replica-memory budget over the largest model's plan."""
    if a.replica_memory is None:
        return a.max_loaded
    from .errors import MemoryPlanError
    from .sources.memplan import HEADROOM_BYTES, plan

    budget = size(a.replica_memory)
    need = max(plan(p, quant=a.quant, ctx=a.slot_context, parallel=max(1, a.slots)).total_bytes + HEADROOM_BYTES
               for p in paths.values())
    if need > budget:
        raise MemoryPlanError(f"--replica-memory {a.replica_memory} cannot hold one model "
                              f"({need / 2**30:.2f} GiB with its KV and headroom)", needed=need, available=budget)
    fits = int(budget // need)
    return min(fits, a.max_loaded) if a.max_loaded else fits


def serve_on_ray(a: argparse.Namespace, paths: dict[str, str], key: str | None, keep_alive: float | None,
                 size: Any) -> int:
    from .errors import SlmkitError
    from .serving.ray import ReplicaConfig, application, require_ray

    try:
        serve = require_ray()
    except SlmkitError as e:
        sys.stderr.write(f"error: slm serve --ray: {e}\n")
        return 1
    import ray

    if a.header_timeout != 10.0:
        sys.stderr.write("error: --header-timeout is not available with --ray (Ray Serve's proxy reads the headers)\n")
        return 2
    try:
        max_loaded = _max_loaded(a, paths, size)
    except SlmkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    hosts = a.image_url_host or []
    server = {"api_key": key, "max_queue": a.max_queue, "cors_origins": a.cors, "keep_alive": keep_alive,
              "max_loaded": max_loaded, "image_urls": hosts if hosts else bool(a.image_urls),
              **({"max_body": a.max_body} if a.max_body else {})}
    load = {"dtype": a.dtype, "quant": a.quant, "group_size": a.group_size, "slots": a.slots,
            "slot_context": a.slot_context}
    config = ReplicaConfig(num_replicas=a.replicas, num_cpus=a.replica_cpus, num_gpus=a.replica_gpus,
                           min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                           target_ongoing_requests=a.target_ongoing or float(a.slots),
                           affinity=not a.no_affinity, fronts=a.fronts, server=server, load=load)
    stop = threading.Event()  # Ctrl-C or a terminate: shut down between two waits, never inside Ray's calls
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=a.ray or None, include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(application(paths, config), name="slmkit", route_prefix="/")
    sys.stderr.write(f"[serving {', '.join(paths)} through Ray Serve on http://{a.host}:{a.port}/v1 (OpenAI) and "
                     f"/api (Ollama), {a.replicas if a.max_replicas is None else f'{a.min_replicas}-{a.max_replicas}'}"
                     f" replica(s){', API key required' if key else ''}]\n")
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()  # the local instance ray.init started (a cluster's own processes stay)
    return 0
