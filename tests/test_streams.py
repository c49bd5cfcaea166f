"""slmkit.streams: the one hand-over from a worker thread to a consumer thread or asyncio task."""
from __future__ import annotations

import asyncio
import threading

import pytest

from slmkit.streams import END, Stream


def produce(stream: Stream, items: list) -> threading.Thread:
    t = threading.Thread(target=lambda: [stream.put(x) for x in items])
    t.start()
    return t


def test_a_thread_gets_the_items_until_end_and_errors_raised():
    s = Stream()
    t = produce(s, [1, 2, END])
    assert list(s) == [1, 2]
    t.join()
    s = Stream()
    t = produce(s, [1, KeyError("boom"), END])
    it = iter(s)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)
    t.join()


def test_an_asyncio_task_gets_them_through_its_loop():
    async def consume(items: list) -> list:
        s = Stream(asyncio.get_running_loop())
        t = produce(s, items)
        try:
            return [x async for x in s]
        finally:
            t.join()

    assert asyncio.run(consume(["a", None, "b", END])) == ["a", None, "b"]
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(consume(["a", ValueError("bad"), END]))


def test_put_after_the_loop_closed_says_so():
    loop = asyncio.new_event_loop()
    s = Stream(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        s.put(1)
