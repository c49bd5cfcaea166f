"""`slm serve --ray` itself, in its own process with its own local Ray instance (~40 s to start here):
the proxy binds 127.0.0.1 as --host says, the API key applies through it (401 without it on an API
route, the answer naming its replica), /health stays open, and the command's Ctrl-C (SIGINT) shuts
Serve and the local Ray instance down."""
from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from slmkit.serving.ray import REPLICA_HEADER
from tests.helpers.serving import slm_serve

pytest.importorskip("ray.serve")


def test_slm_serve_ray_binds_its_host_and_applies_the_api_key(tmp_path):
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path / "phi", "gqa")
    # Ctrl-C (SIGINT) must shut Serve and the local Ray instance down cleanly: exit status 0
    with slm_serve({"phi": folder}, "--ray", "--api-key", "k", "--replica-cpus", "0.5", "--dtype", "float32",
                   start_s=180, stop=signal.SIGINT, clean_exit=True) as base:
        port = int(base.rsplit(":", 1)[1])
        body = {"model": "phi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(base + "/v1/chat/completions", json=body, headers={"authorization": "Bearer k"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        assert ok.headers[REPLICA_HEADER]
        assert httpx.get(base + "/metrics").status_code == 401
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert listening and all("127.0.0.1:" in line for line in listening.splitlines()), listening
