"""Local HTTP servers standing in for the Hugging Face hub (the routes huggingface_hub's model_info
and hf_hub_download use) and for an Ollama registry (manifests + blobs), with range requests, a
mode that cuts a file off mid-way and then stops the server (a killed server), and a mode that
serves corrupt bytes once."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fake:
    """Shared state: files, faults to inject, and the requests seen (method, path, Range)."""

    def __init__(self) -> None:
        self.hub: dict[str, dict[str, bytes]] = {}  # repo -> file -> bytes
        self.blobs: dict[str, bytes] = {}  # hex digest -> bytes
        self.manifests: dict[str, dict[str, Any]] = {}  # "ns/model:tag" -> manifest
        self.cut: dict[str, int] = {}  # path suffix -> bytes to send before dropping the connection (once)
        self.corrupt: dict[str, int] = {}  # path suffix -> times to serve flipped bytes
        self.seen: list[tuple[str, str, str | None]] = []
        self.server: ThreadingHTTPServer | None = None

    def add_ollama(self, name: str, gguf: bytes, extra: dict[str, bytes] | None = None) -> dict[str, Any]:
        config = json.dumps({"model_format": "gguf", "file_type": "Q4_K_M"}).encode()
        self.blobs[sha(config)] = config
        self.blobs[sha(gguf)] = gguf
        layers = [{"mediaType": MODEL_MEDIA_TYPE, "digest": f"sha256:{sha(gguf)}", "size": len(gguf)}]
        for media, data in (extra or {}).items():
            self.blobs[sha(data)] = data
            layers.append({"mediaType": media, "digest": f"sha256:{sha(data)}", "size": len(data)})
        m = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
             "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                        "digest": f"sha256:{sha(config)}", "size": len(config)}, "layers": layers}
        self.manifests[name] = m
        return m


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def _json(self, obj: Any, code: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()

        def _file(self, data: bytes, etag: str, head: bool, extra: dict[str, str] | None = None) -> None:
            key = next((k for k in fake.corrupt if self.path.endswith(k)), None)
            if key and fake.corrupt[key] > 0 and not head:
                fake.corrupt[key] -= 1
                data = bytes(b ^ 0xFF for b in data)
            start = 0
            m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if m and not head:
                start = int(m.group(1))
            self.send_response(206 if start else 200)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            body = data[start:]
            cut = next((k for k in fake.cut if self.path.endswith(k)), None)
            if cut is not None:
                n = fake.cut.pop(cut)
                self.wfile.write(body[:n])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # a killed server: the connection drops mid-file ...
                threading.Thread(target=_stop, args=(fake.server,)).start()  # ... and nothing answers any more
                return
            self.wfile.write(body)

        def _route(self, head: bool) -> None:
            fake.seen.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
            if m:
                files = fake.hub.get(m.group(1))
                if files is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sib = [{"rfilename": n, "size": len(d), **({"lfs": {"sha256": sha(d), "size": len(d),
                                                                     "pointerSize": 130}}
                                                            if n.endswith((".safetensors", ".gguf")) else {})}
                       for n, d in files.items()]
                return self._json({"id": m.group(1), "modelId": m.group(1), "sha": COMMIT, "siblings": sib,
                                   "private": False, "tags": [], "downloads": 0, "likes": 0})
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                data = fake.hub.get(m.group(1), {}).get(m.group(3))
                if data is None:
                    return self._missing()
                return self._file(data, sha(data), head, {"X-Repo-Commit": COMMIT})
            m = re.match(r"^/v2/([^/]+)/([^/]+)/manifests/([^/]+)$", path)
            if m:
                man = fake.manifests.get(f"{m.group(1)}/{m.group(2)}:{m.group(3)}")
                return self._json(man) if man else self._json({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, 404)
            m = re.match(r"^/v2/([^/]+)/([^/]+)/blobs/sha256:([0-9a-f]{64})$", path)
            if m and m.group(3) in fake.blobs:
                return self._file(fake.blobs[m.group(3)], m.group(3), head)
            self._missing()

        def do_GET(self) -> None:
            self._route(False)

        def do_HEAD(self) -> None:
            self._route(True)

    return H


def _stop(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()  # the port refuses connections, as a dead process's would


def serve(fake: Fake, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start (or restart, on the same port) the fake; returns (server, base URL)."""
    ThreadingHTTPServer.allow_reuse_address = True
    for _ in range(50):  # a restart waits for the killed server to let go of its port
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"port {port} stays in use")
    server.daemon_threads = True
    fake.server = server
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
