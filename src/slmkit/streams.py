"""One hand-over of results from a worker thread to their consumer: the producer puts items, an
exception (raised at the consumer, in its own thread or task), and END; the consumer iterates and
stops at END. The batch engine (to a request's thread) and the server's scheduler (to a request's
asyncio task) both use it. A leaf module: it imports nothing of slmkit, so any layer may use it."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

END = object()  # the last item of every stream


class Stream:
    """Items from producer threads to one consumer. Without a loop the consumer iterates in a
    thread (`for item in stream`, blocking); with one it is a task of that event loop (`async for
    item in stream`), and put() hands each item over with call_soon_threadsafe, raising
    RuntimeError once that loop is closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._q: Any = queue.Queue() if loop is None else asyncio.Queue()

    def put(self, item: Any) -> None:
        """An item, an exception to raise at the consumer, or END."""
        if self._loop is None:
            self._q.put(item)
        else:
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            item = await self._q.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def validated_first(items: Iterator[Any]) -> Iterator[Any]:
    """Run a generator up to its first item now, so that a bad request raises at the call, not at
    the consumer's first next()."""
    first = next(items)

    def rest() -> Iterator[Any]:
        yield first
        yield from items

    return rest()


def on_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) run on a thread of its own that ends with it: its result here, or its
    exception raised here.

    For heavy one-off work (loading a model, filling a KV cache) done outside the thread that will
    decode: the OpenMP runtime (libgomp, which torch and the kernel share) keeps a pool of worker
    threads for every thread that ever ran a parallel region, for that thread's whole life, and
    once it manages more threads than there are CPUs, every pool stops spinning between regions
    (GOMP's throttled spin). A decode step runs ~100 short regions, and each then waits for its
    workers to wake from a futex; a thread that ends takes its pool with it, so the thread that
    decodes stays the only one with a pool."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
            box.append((False, e))

    t = threading.Thread(target=run, name="slmkit-oneoff", daemon=True)  # daemon: Ctrl-C at join() leaves
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
