"""Image parts: data: URLs decoded, http(s) URLs fetched only when the server allows it, with byte,
time and pixel limits; every failure is a 400 naming the part, and the server keeps serving."""
from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import slmkit
from slmkit.errors import InvalidRequestError

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
    seen: list = []

    def do_GET(self):  # noqa: N802
        Files.seen.append(self.path)
        if self.path == "/drip.png":  # a byte every 0.4 s: each read is quick, the whole is not
            self.send_response(200)
            self.end_headers()
            try:
                for b in png():
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.4)
            except OSError:  # the client gave up, as it should
                pass
            return
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
def server(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    llm = slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("img"), "gqa"), dtype="float32")
    base, srv, t = serve_models({"tiny": llm})
    yield base
    srv.should_exit = True
    t.join(timeout=10)


def ask(base: str, url: str) -> httpx.Response:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    return httpx.post(base + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                      json={"model": "tiny", "messages": msgs, "max_tokens": 3})


def test_a_text_only_model_refuses_images_before_fetching_them(server, files):
    client = openai.OpenAI(base_url=server + "/v1", api_key="k", max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    with pytest.raises(openai.BadRequestError) as e:  # the official client, an image part
        client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert "text-only" in e.value.body["message"] and e.value.body["param"] == "messages"
    Files.seen.clear()
    r = ask(server, files + "/ok.png")
    assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]
    assert Files.seen == []  # nothing was fetched for a model that cannot use it
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server, headers={"Authorization": "Bearer k"})
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="tiny", messages=[{"role": "user", "content": "hi", "images": [png()]}])
    assert e.value.status_code == 400 and "text-only" in str(e.value)
    assert httpx.get(server + "/health").status_code == 200


def resolve(url: str, policy=None):
    from slmkit.server import images

    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    return asyncio.run(images.resolve(msgs, policy or images.FetchPolicy()))


def named_error(url: str, policy=None) -> str:
    with pytest.raises(InvalidRequestError) as e:
        resolve(url, policy)
    assert e.value.param == "messages[0].content[1].image_url"
    return str(e.value)


@pytest.mark.parametrize("url,words", [
    ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "not a readable image"),
    ("data:image/png;base64," + base64.b64encode(png()[:40]).decode(), "not a readable image"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png,rawdata", "only base64"),
    ("file:///etc/passwd", "data: or http(s)"),
    ("http://example.com/x.png", "remote hosts is off on this server"),
    ("http://127.0.0.1:9/x.png", "fetching the image failed (ConnectError"),
    ("http://[::1", "not a valid URL"),
    ("http://localhost:99999/x.png", "fetching the image failed"),
    ("http://localhost/\x00", "fetching the image failed"),
])
def test_bad_images_are_named_errors(url, words):
    assert words in named_error(url)


def test_good_images_become_checked_data_urls(files):
    from slmkit.server import images

    data = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert resolve(data)[0]["content"][1]["image_url"]["url"] == data
    fetched = resolve(files + "/ok.png")[0]["content"][1]["image_url"]["url"]  # this machine: allowed
    assert base64.b64decode(fetched.split(",", 1)[1]) == png()
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert "not a readable image" in named_error("data:image/png;base64," + base64.b64encode(eps).decode())
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}] * 17}]
    with pytest.raises(InvalidRequestError, match="at most 16 images"):
        asyncio.run(images.resolve(many, images.FetchPolicy()))
    assert images.has_images(many) and not images.has_images([{"role": "user", "content": "hi"}])


def test_fetching_is_limited_by_host_status_size_and_time(files):
    from slmkit.server import images

    listed = images.FetchPolicy(allow=["127.0.0.1"])
    assert "not in the server's --image-urls list" in named_error("http://example.org/x.png", listed)
    assert "HTTP 404" in named_error(files + "/missing.png", listed)
    assert "not a readable image" in named_error(files + "/text", listed)
    small = images.FetchPolicy(max_bytes=1000, timeout_s=1.0)
    assert "over the limit of 1000 bytes" in named_error(files + "/big.png", small)
    t0 = time.perf_counter()
    assert "timed out after 1 s" in named_error(files + "/drip.png", small)  # the whole fetch, not each read
    assert time.perf_counter() - t0 < 3
    assert "timed out after 1 s" in named_error(files + "/slow.png", small)


def test_pixel_limit():
    from slmkit.server.images import check_image

    with pytest.raises(InvalidRequestError, match="over the limit of 100"):
        check_image(png(20, 20), "p", max_pixels=100)
    assert check_image(png(20, 20), "p") == ("png", 20, 20)


def test_ollama_images_become_parts_before_the_text_and_errors_name_them():
    from slmkit.server import images
    from slmkit.server.ollama_api import images_to_parts

    b64 = base64.b64encode(png()).decode()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # as `base64` writes it; Go takes it
    assert "\n" in wrapped
    msg = images_to_parts({"role": "user", "content": "What is this?",
                           "images": [wrapped, "data:image/png;base64," + b64]})
    assert [p["type"] for p in msg["content"]] == ["image_url", "image_url", "text"] and msg["role"] == "user"
    out = asyncio.run(images.resolve([msg], images.FetchPolicy()))
    assert [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in out[0]["content"][:2]] == [png()] * 2
    assert images_to_parts({"role": "user", "content": "hi", "images": []}) == {"role": "user", "content": "hi"}
    with pytest.raises(InvalidRequestError) as e:
        images_to_parts({"role": "user", "content": "hi", "images": [b"raw"]}, "messages[2].images")
    assert e.value.param == "messages[2].images"
    bad = images_to_parts({"role": "user", "images": [b64, base64.b64encode(b"junk").decode()]})
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(images.resolve([{"role": "user", "content": "hi"}, bad], images.FetchPolicy(),
                                   lambda i, j: f"messages[{i}].images[{j}]"))
    assert e.value.param == "messages[1].images[1]" and "not a readable image" in str(e.value)
