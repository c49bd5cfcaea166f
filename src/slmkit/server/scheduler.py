"""The request scheduler under the HTTP server: one worker thread owns the model and runs the
queued requests; the asyncio side receives their chunks. Bounded queue (full -> ServerBusyError,
which the server turns into 503 + retry-after); a request whose client went away is cancelled before its
next token, so its KV cache is freed within one step.

`workers` threads take jobs in FIFO order. With one worker requests run one at a time; with a
model in continuous-batching mode (LLM.enable_batching) one worker per slot lets that many
requests share each decode step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServerBusyError
from ..streams import END, Stream


def _deliver(job: Job, item: Any) -> bool:
    """Hand an item to the request's event loop; False if that loop is gone (the job is dropped)."""
    try:
        job.out.put(item)
        return True
    except RuntimeError:  # the loop closed (server shut down): drop the job, keep the worker
        job.cancelled.set()
        return False


@dataclass
class Job:
    work: Callable[[threading.Event], Iterator[Any]]  # yields chunks; should stop when the event is set
    out: Stream  # to the request's event loop
    cancelled: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    def __init__(self, max_queue: int = 64, workers: int = 1):
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.running = 0
        self.served = 0
        self._threads = [threading.Thread(target=self._worker, name=f"slmkit-worker-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.running += 1
            try:
                if not job.cancelled.is_set():
                    it = job.work(job.cancelled)
                    try:
                        for chunk in it:
                            if job.cancelled.is_set():
                                break
                            if not _deliver(job, chunk):
                                break
                    finally:
                        close = getattr(it, "close", None)
                        if close is not None:  # a cancelled generation frees its KV cache now
                            close()
            except BaseException as e:  # delivered to the request's handler
                _deliver(job, e)
            finally:
                with self._lock:
                    self.running -= 1
                    self.served += 1
                _deliver(job, END)

    async def stream(self, work: Callable[[threading.Event], Iterator[Any]]) -> AsyncGenerator[Any, None]:
        """Queue `work` and yield its chunks; exceptions it raises are re-raised here. Leaving the
        iteration early (client gone) cancels the job."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise ServerBusyError(self._waiting)
            self._waiting += 1
        job = Job(work, Stream(asyncio.get_running_loop()))
        self._jobs.put(job)
        try:
            async for item in job.out:
                yield item
        finally:
            job.cancelled.set()
