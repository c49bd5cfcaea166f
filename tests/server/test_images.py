"""Image parts: data: URLs decoded, http(s) URLs fetched only when the server allows it, with byte,
time and pixel limits; every failure is a 400 naming the part, and the server keeps serving."""
from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import slmkit

pytest.importorskip("fastapi")
PIL = pytest.importorskip("PIL")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.server.test_app import serve_models  # noqa: E402


def png(w: int = 8, h: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Files(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/ok.png":
            body = png()
        elif self.path == "/big.png":
            body = png() + b"\0" * 5000
        elif self.path == "/slow.png":
            time.sleep(3)
            body = png()
        elif self.path == "/text":
            body = b"not an image"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def files():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    llm = slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("img"), "gqa"), dtype="float32")
    closed = serve_models({"tiny": llm})  # image URLs off (the default)
    opened = serve_models({"tiny": llm}, image_urls=["127.0.0.1"])
    yield closed[0], opened[0], opened[1].config.app.state.image_policy
    for _, srv, t in (closed, opened):
        srv.should_exit = True
        t.join(timeout=10)


def ask(base: str, url: str) -> httpx.Response:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    return httpx.post(base + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                      json={"model": "tiny", "messages": msgs, "max_tokens": 3})


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_a_valid_image_reaches_the_model_which_names_its_limit(servers):
    closed = servers[0]
    client = openai.OpenAI(base_url=closed + "/v1", api_key="k", max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    with pytest.raises(openai.BadRequestError) as e:  # the image decoded fine; this model is text-only
        client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert "text-only" in e.value.body["message"]


@pytest.mark.parametrize("url,words,param", [
    ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "not a readable image", "content[1]"),
    ("data:image/png;base64," + base64.b64encode(png()[:40]).decode(), "not a readable image", "content[1]"),
    ("data:image/png;base64,@@@", "not valid base64", "content[1]"),
    ("data:image/png,rawdata", "only base64", "content[1]"),
    ("file:///etc/passwd", "data: or http(s)", "content[1]"),
    ("http://example.com/x.png", "remote hosts is off on this server", "content[1]"),
    ("http://127.0.0.1:9/x.png", "fetching the image failed (ConnectError", "content[1]"),
])
def test_bad_images_are_named_400s(servers, url, words, param):
    closed = servers[0]
    err = error_of(ask(closed, url))
    assert words in err["message"] and err["param"] == f"messages[0].{param}.image_url"
    assert ask(closed, "data:image/png;base64," + base64.b64encode(png()).decode()).status_code == 400
    assert httpx.get(closed + "/health").status_code == 200


def test_fetching_is_limited_by_host_status_size_and_time(servers, files, monkeypatch):
    opened = servers[1]
    assert "text-only" in error_of(ask(opened, files + "/ok.png"))["message"]  # fetched and decoded
    assert "HTTP 404" in error_of(ask(opened, files + "/missing.png"))["message"]
    assert "not a readable image" in error_of(ask(opened, files + "/text"))["message"]
    assert "not in the server's --image-urls list" in error_of(ask(opened, "http://example.org/x.png"))["message"]
    closed = servers[0]  # this machine's URLs are fetched even where remote ones are off
    assert "text-only" in error_of(ask(closed, files.replace("127.0.0.1", "localhost") + "/ok.png"))["message"]
    policy = opened_policy(servers)
    monkeypatch.setattr(policy, "max_bytes", 1000)
    monkeypatch.setattr(policy, "timeout_s", 1.0)
    assert "over the limit of 1000 bytes" in error_of(ask(opened, files + "/big.png"))["message"]
    assert "timed out after 1 s" in error_of(ask(opened, files + "/slow.png"))["message"]
    assert "text-only" in error_of(ask(opened, files + "/ok.png"))["message"]  # still serving


def opened_policy(servers):
    return servers[2]


def test_pixel_limit(servers):
    from slmkit.errors import InvalidRequestError
    from slmkit.server.images import check_image

    with pytest.raises(InvalidRequestError, match="over the limit of 100"):
        check_image(png(20, 20), "p", max_pixels=100)
    assert check_image(png(20, 20), "p") == ("png", 20, 20)
