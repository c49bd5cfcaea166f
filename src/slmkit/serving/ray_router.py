"""Ray Serve's power-of-two-choices router, preferring a conversation's replica (slmkit.serving.ray's
doc). Its own module, imported by Ray Serve by name where it routes, since it needs Ray at import."""
from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter

from .ray import rendezvous


class SessionAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """The candidates are Ray's: the replicas holding the request's multiplexed model (while Ray waits
    for one to report it; then the replicas with the fewest models, then all), else all. Among them
    the request's key (its session or prompt prefix; the front sets it as Ray's session id) picks
    one by rendezvous hashing, tried first; then the less loaded of two random candidates, as Ray's
    own router does, when that one refuses (its queue full) or there is no key."""

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> Any:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        if not ids:  # Ray waits (backs off) for a replica to report the model
            return []
        pool = [self._replicas[i] for i in ids if i in self._replicas]
        if not pool:
            return []
        two = random.sample(pool, min(2, len(pool)))
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key:
            return [two]
        by_id = {r.replica_id.unique_id: r for r in pool}
        return [[by_id[rendezvous(key, sorted(by_id))]], two]  # the others only if the key's replica refuses
