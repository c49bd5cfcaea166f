"""A local stand-in for a cloud API: it records every request (method, path, query, headers, body)
and answers from a script, so the cloud backends' wire traffic can be checked exactly without
reaching any cloud. Stdlib http.server on a real socket in a thread.

    rec = Recorder()
    rec.reply("POST", "/inference/chat/completions", json_body=completion("hi"))
    ... point a client at rec.url + "/inference" ...
    (req,) = rec.requests; assert req.headers["authorization"] == "Bearer k"
    rec.close()

A path with no scripted reply left answers 599, so an unexpected request fails loudly."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    json_body: Any = None
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Any] | None = None  # SSE: each a dict (one data: line) or a str sent as it is
    delay: float = 0.0  # seconds before the status line (a read timeout)


def completion(text: str, *, model: str = "m", finish: str = "stop", usage: tuple[int, int] | None = (5, 2),
               tool_calls: list[dict] | None = None, logprobs: Any = None) -> dict:
    """An OpenAI chat.completion body (spec A6)."""
    msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                            "choices": [{"index": 0, "message": msg, "logprobs": logprobs, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def chunks(pieces: list[str], *, finish: str = "stop", usage: tuple[int, int] | None = (5, 2),
           tool_deltas: list[dict] | None = None) -> list[Any]:
    """SSE events of a streamed answer in OpenAI's order: role, content pieces, tool-call deltas,
    the finish, the usage-only chunk (choices []), [DONE]."""
    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                "usage": None}

    out: list[Any] = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": p}) for p in pieces]
    out += [chunk({"tool_calls": [d]}) for d in tool_deltas or []]
    out.append(chunk({}, finish))
    if usage is not None:
        out.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                    "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}})
    out.append("[DONE]")
    return out


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._script: dict[tuple[str, str], list[Reply]] = {}
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                recorder._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reply(self, method: str, path: str, **kw: Any) -> None:
        """Queue the answer to the next `method path` request (path without the query)."""
        with self._lock:
            self._script.setdefault((method, path), []).append(Reply(**kw))

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        n = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(n) if n else b""
        req = Request(h.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in h.headers.items()}, body)
        with self._lock:
            self.requests.append(req)
            queue = self._script.get((h.command, parts.path))
            r = queue.pop(0) if queue else Reply(599, {"error": {"message": f"unscripted {h.command} {parts.path}"}})
        if r.delay:
            time.sleep(r.delay)
        try:
            if r.events is not None:
                self._stream(h, r)
            else:
                data = json.dumps(r.json_body).encode() if r.json_body is not None else r.raw
                h.send_response(r.status)
                h.send_header("content-type", "application/json" if r.json_body is not None else "text/plain")
                h.send_header("content-length", str(len(data)))
                for k, v in r.headers.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    @staticmethod
    def _stream(h: BaseHTTPRequestHandler, r: Reply) -> None:
        h.send_response(r.status)
        h.send_header("content-type", "text/event-stream")
        h.send_header("connection", "close")
        for k, v in r.headers.items():
            h.send_header(k, v)
        h.end_headers()
        for e in r.events or []:
            line = e if isinstance(e, str) else json.dumps(e)
            h.wfile.write(f"data: {line}\n\n".encode())
            h.wfile.flush()
        h.close_connection = True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
