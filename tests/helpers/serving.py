"""slm serve's app on a real socket in a thread, with the connection limits slm serve uses, or `slm serve`
itself in its own process."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Any, *, header_timeout: float | None = None) -> tuple[str, Any, threading.Thread]:
    """(base URL, uvicorn.Server, its thread) once it listens; stop it with server.should_exit = True."""
    import uvicorn

    from slmkit.server.protocol import uvicorn_options

    opts = uvicorn_options() if header_timeout is None else uvicorn_options(header_timeout)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **opts))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, t


def stop_server(srv: Any, t: threading.Thread) -> None:
    srv.should_exit = True
    t.join(timeout=10)


@contextmanager
def slm_serve(models: dict[str, Any], *flags: str, env: dict[str, str] | None = None, start_s: float = 60.0,
              stop: int | None = None, clean_exit: bool = False) -> Iterator[str]:
    """`slm serve NAME=PATH ... FLAGS` in its own process on a free port: its base URL once /health
    answers within start_s seconds (the process's stderr in the failure if it stops first); on exit
    sent `stop` (a signal number; default SIGTERM) and, with clean_exit, required to exit with 0."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "SLMKIT_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", *(f"{n}={p}" for n, p in models.items()),
                             "--port", str(port), *flags], env={**environ, **(env or {})},
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(int(start_s * 10)):
            if proc.poll() is not None:
                raise RuntimeError(f"slm serve stopped: {proc.communicate()[1][-3000:]}")
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"slm serve did not answer /health within {start_s:g} s")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if stop is None else stop)
        err = proc.communicate(timeout=90)[1]
    if clean_exit and proc.returncode != 0:
        raise AssertionError(f"slm serve exited with {proc.returncode}: {err[-3000:]}")
