"""The server's own failures are typed SlmkitErrors, and server/errors.py maps each to the status
and body a client gets (404 model_not_found, 503 + retry-after when busy, 500 model_load_failed)."""
from __future__ import annotations

import asyncio
import json

import pytest

from slmkit.errors import (
    ConfigError,
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServerBusyError,
    SlmkitError,
)

pytest.importorskip("fastapi")


def test_registry_refusals_are_typed_and_name_what_is_wrong():
    from slmkit.server.registry import ModelSpec, Registry

    with pytest.raises(ConfigError, match="models"):
        Registry({})
    with pytest.raises(ConfigError, match="max_loaded"):
        Registry({"x": ModelSpec(lambda: None)}, max_loaded=0)
    reg = Registry({"x": ModelSpec(lambda: None)}, preload=False)
    try:
        with pytest.raises(ModelNotFoundError) as e:
            reg.entry("nope")
        assert isinstance(e.value, SlmkitError) and e.value.name == "nope" and e.value.served == ["x"]
        assert "served: x" in str(e.value)
    finally:
        reg.close()


def test_a_full_queue_is_a_server_busy_error():
    from slmkit.server.scheduler import Scheduler

    async def submit() -> None:
        async for _ in Scheduler(max_queue=0).stream(lambda cancelled: iter([1])):
            pass

    with pytest.raises(ServerBusyError) as e:
        asyncio.run(submit())
    assert isinstance(e.value, SlmkitError) and e.value.waiting == 0


@pytest.mark.parametrize("error, status, code, retry", [
    (ModelNotFoundError("nope", ["x"]), 404, "model_not_found", None),
    (ModelUnavailableError("all busy", busy=True), 503, "overloaded", "2"),
    (ModelUnavailableError("failed to load"), 500, "model_load_failed", None),
    (ServerBusyError(64), 503, "overloaded", "2"),
    (EngineError("stopped", dead=True), 503, "engine_dead", "10"),
    (EngineError("a step failed"), 500, "internal_error", None),
    (ContextLengthError(10, 5), 400, "context_length_exceeded", None),
    (InvalidRequestError("bad", param="top_p"), 400, None, None),
    (RuntimeError("bug"), 500, "internal_error", None)])
def test_one_mapping_from_exceptions_to_responses(error, status, code, retry):
    from slmkit.server.errors import in_stream, response_for

    r = response_for(error)
    body = json.loads(r.body)["error"]
    assert (r.status_code, body["code"], r.headers.get("retry-after")) == (status, code, retry)
    kind = "invalid_request_error" if status < 500 else "server_error"
    assert body["type"] == kind
    assert json.loads(in_stream(error, "text/event-stream")[6:])["error"]["type"] == kind  # mid-stream, same kind
    assert json.loads(in_stream(error, "application/x-ndjson")) == {"error": str(error)}
