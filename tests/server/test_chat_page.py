"""The chat page at / in headless Chromium (Debian's `chromium`, driven by Playwright) against a real
`slm serve` on a tiny vision model and a tiny text-only one: images attached through the file picker,
a paste and a drop, shown as removable thumbnails, sent as image_url data: URLs, the streamed answer
shown with the images in the transcript; the attach button only for the model that takes images."""
from __future__ import annotations

import base64
import io
import json

import pytest

from tests.helpers.serving import slm_serve

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
PIL = pytest.importorskip("PIL")


def png(w: int, h: int, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`slm serve` on a tiny vision folder ("eyes") and a tiny text-only one ("text")."""
    from tests.helpers.tiny_models import make_phi3_folder, make_phi3v_folder

    root = tmp_path_factory.mktemp("page")
    eyes = make_phi3v_folder(root / "eyes")
    text = make_phi3_folder(root / "text", "gqa", max_position_embeddings=2048)
    with slm_serve({"eyes": eyes, "text": text}, "--dtype", "float32") as base:
        yield base


# a paste and a drop of an image file, as a browser fires them (a DataTransfer holding a File)
_EVENT_WITH_FILE = """([kind, b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: "image/png"}));
  const target = kind === "paste" ? document.getElementById("input") : document.getElementById("form");
  const ev = kind === "paste" ? new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true})
                              : new DragEvent(kind, {dataTransfer: dt, bubbles: true, cancelable: true});
  target.dispatchEvent(ev);
}"""


def drive_page(browser, base: str, model: str, text_model: str | None = None) -> None:
    """Attach three images (picker, paste, drop), remove one, ask, and check what was sent, what is
    shown, and that the answer shown is the server's answer to the same request."""
    page = browser.new_page()
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    page.goto(base + "/")
    page.select_option("#model", model)
    page.wait_for_selector("#attach", state="visible")
    red, green, blue = png(40, 30, (220, 20, 20)), png(30, 60, (20, 200, 20)), png(16, 16, (20, 20, 220))
    page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": red}])
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 1")
    page.evaluate(_EVENT_WITH_FILE, ["paste", base64.b64encode(green).decode(), "green.png"])
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 2")
    for kind in ("dragover", "drop"):
        page.evaluate(_EVENT_WITH_FILE, [kind, base64.b64encode(blue).decode(), "blue.png"])
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 3")
    page.click("#thumbs .thumb:nth-child(2) button")  # removes the pasted (green) one
    page.wait_for_function("document.querySelectorAll('#thumbs img').length === 2")
    page.click("#toggle")  # the settings
    page.fill("#temp", "0")
    page.fill("#input", "What colours are these?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant, .msg.error').length === 1 && "
                           "document.getElementById('stop').disabled", timeout=120_000)  # the answer is in

    assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
    assert page.locator("#thumbs img").count() == 0  # the composer is empty again
    shown = page.locator(".msg.user img")
    assert shown.count() == 2  # the thumbnails are in the transcript
    assert [shown.nth(i).evaluate("i => i.naturalWidth") for i in range(2)] == [40, 16]
    answer = page.locator(".msg.assistant").last.get_attribute("data-text")  # the markdown source shown

    (body,) = sent
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts[:2]] == [red, blue]
    assert parts[2]["text"] == "What colours are these?" and body["model"] == model and body["temperature"] == 0
    again = httpx.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    assert again.status_code == 200, again.text
    expected = again.json()["choices"][0]["message"]["content"]
    assert expected and answer == expected  # the page shows the whole streamed answer

    if text_model:  # a text-only model: no attach button, and a paste attaches nothing
        page.select_option("#model", text_model)
        page.wait_for_selector("#attach", state="hidden")
        page.evaluate(_EVENT_WITH_FILE, ["paste", base64.b64encode(red).decode(), "red.png"])
        assert page.locator("#thumbs img").count() == 0
    page.close()


def test_the_chat_page_sends_images_and_shows_the_answer(browser, served):
    drive_page(browser, served, "eyes", text_model="text")
