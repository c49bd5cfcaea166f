"""Ray Serve's power-of-two-choices router, preferring a session's replica (slmkit.serving.ray's doc).
Its own module, imported by Ray Serve by name on the replicas' callers, since it needs Ray at import."""
from __future__ import annotations

from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from .ray import rendezvous


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> Any:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session or not candidate_replicas:
            return ranks
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        home = by_id[rendezvous(session, sorted(by_id))]
        return [[home], *ranks]  # the others only if the session's replica refuses
