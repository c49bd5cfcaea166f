"""Continuous batching under faults: a failing request ends alone, a failing step ends its rows,
and an engine that stops says so and fails every request at once instead of leaving it waiting."""
from __future__ import annotations

import threading
import time

import pytest

import slmkit
from slmkit.engine.batching import BatchEngine
from slmkit.errors import EngineError, InvalidRequestError

HANG_S = 120  # a request that has not ended by then hangs (the bug); not a speed limit

GOOD = (list(range(5, 15)), dict(max_new_tokens=12, temperature=0, ignore_eos=True))


def in_thread(fn):
    """Run fn() in a thread; its result, or the exception it raised. A hang fails the test."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), "the request never ended"
    return out


def queued_then_started(llm, calls: list) -> list[dict]:
    """Submit every call (fn() on its own thread) before the engine's thread starts, so they all
    join its first step; then start it. Returns each call's in_thread() outcome."""
    batch = BatchEngine(llm.backend.engine, slots=4, slot_context=128, start=False)
    llm.backend.batch = batch
    outs: list[dict] = [{} for _ in calls]
    threads = [threading.Thread(target=lambda i=i: outs[i].update(in_thread(calls[i])), daemon=True)
               for i in range(len(calls))]
    for t in threads:
        t.start()
    while batch.incoming.qsize() < len(calls):  # every request is queued
        time.sleep(0.01)
    batch.start()
    for t in threads:
        t.join(HANG_S + 5)
    return outs


@pytest.fixture
def llm(phi3_folders):
    return slmkit.load(phi3_folders("gqa"), dtype="float32")


def test_a_row_that_fails_on_its_second_token_ends_alone(llm):
    solo = llm.generate(GOOD[0], **GOOD[1]).token_ids
    seen = []

    def breaks_on_second_token(ids, logits):
        seen.append(True)
        if len(seen) == 2:
            raise RuntimeError("the scorer broke")
        return logits

    bad = lambda: llm.generate([7, 8, 9], max_new_tokens=12, temperature=0.8, seed=1,
                               scorers=[breaks_on_second_token])
    good = lambda: llm.generate(GOOD[0], **GOOD[1]).token_ids
    bad_out, good_out = queued_then_started(llm, [bad, good])
    err = bad_out["error"]
    assert isinstance(err, EngineError) and not err.dead and "the scorer broke" in str(err)
    assert good_out == {"value": solo}  # decoded beside the failing row, exactly as alone
    batch = llm.backend.batch
    assert batch.alive and batch.active == 0 and batch.cache.n == 0  # both slots freed
    assert in_thread(good) == {"value": solo}  # and the engine goes on


def test_a_typed_error_in_one_row_reaches_its_caller_as_it_is(llm):
    def nothing_left(ids, logits):  # every token ruled out: no token can be chosen
        return logits - float("inf")

    bad = lambda: llm.generate([7, 8, 9], max_new_tokens=4, temperature=0, scorers=[nothing_left])
    good = lambda: llm.generate(GOOD[0], **GOOD[1]).token_ids
    solo = good()
    bad_out, good_out = queued_then_started(llm, [bad, good])
    assert isinstance(bad_out["error"], InvalidRequestError)
    assert good_out == {"value": solo}


def test_a_failing_batch_step_ends_its_rows_and_the_engine_goes_on(llm, monkeypatch):
    solo = llm.generate(GOOD[0], **GOOD[1]).token_ids
    model = llm.backend.engine.model
    real, failed = model.forward, []

    def fails_once_on_a_batch(ids, cache, *a, **kw):
        if ids.shape[0] > 1 and not failed:  # the shared decode step of several rows
            failed.append(True)
            raise RuntimeError("out of memory in the batch step")
        return real(ids, cache, *a, **kw)

    monkeypatch.setattr(model, "forward", fails_once_on_a_batch)
    calls = [lambda i=i: llm.generate([5 + i, 6, 7], max_new_tokens=8, temperature=0, ignore_eos=True)
             for i in range(3)]
    outs = queued_then_started(llm, calls)
    assert failed and all(isinstance(o.get("error"), EngineError) for o in outs)
    assert "out of memory in the batch step" in str(outs[0]["error"])
    batch = llm.backend.batch
    assert batch.alive and batch.active == 0 and batch.cache.n == 0
    monkeypatch.setattr(model, "forward", real)
    assert in_thread(lambda: llm.generate(GOOD[0], **GOOD[1]).token_ids) == {"value": solo}


def test_an_engine_that_stops_fails_queued_and_later_requests_at_once(llm, monkeypatch):
    llm.enable_batching(slots=2, context=64)
    batch = llm.backend.batch
    monkeypatch.setattr(batch, "_drop_cancelled", lambda: (_ for _ in ()).throw(RuntimeError("engine bug")))
    out = in_thread(lambda: llm.generate(GOOD[0], **GOOD[1]))
    assert isinstance(out["error"], EngineError) and out["error"].dead and "engine bug" in str(out["error"])
    assert not batch.alive and "engine bug" in batch.dead
    out = in_thread(lambda: llm.generate(GOOD[0], **GOOD[1]))  # later: at once, never queued
    assert isinstance(out["error"], EngineError) and out["error"].dead
    assert batch.incoming.qsize() == 0
