"""slm serve's app on a real socket in a thread, with the connection limits slm serve uses."""
from __future__ import annotations

import socket
import threading
import time
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
