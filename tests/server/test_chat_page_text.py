"""The chat page at / in headless Chromium against `slm serve --api-key ... --slots 1` on a tiny
text model: the key typed in (sessionStorage only, never in a URL), the settings in the request
body, the streamed answer and its tokens/s, stop mid-answer (the answer stops growing and the
server, which saw the disconnect, serves the next request at once), markdown code blocks, and a
model answer holding <script> and <img onerror> shown as text."""
from __future__ import annotations

import json
import re
import time

import pytest

from tests.helpers.serving import slm_serve

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
KEY = "page-secret-4711"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _generated(base: str) -> int:
    """Tokens the server has generated so far (its /metrics)."""
    text = httpx.get(base + "/metrics", headers=AUTH).text
    return int(re.search(r'slmkit_generated_tokens_total\{model="text"\} (\d+)', text).group(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    # a long context, so that the stopped answer (7900 tokens asked) would run for many seconds had the
    # server missed the disconnect: the tiny model decodes ~600 tok/s, and 1900 tokens once ran out before
    # a loaded CI machine's disconnect reached the server
    text = make_phi3_folder(tmp_path_factory.mktemp("page-text"), "gqa", max_position_embeddings=8192)
    with slm_serve({"text": text}, "--dtype", "float32", "--api-key", KEY, "--slots", "1",
                   "--slot-context", "8192") as base:
        yield base


def answered(page, n: int, timeout: float = 120_000) -> None:
    """Wait until the n-th answer is complete (done, stopped or failed; Stop is disabled again)."""
    page.wait_for_function(f"document.querySelectorAll('[data-done]').length === {n} && "
                           "document.getElementById('stop').disabled", timeout=timeout)


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_send_settings_stop_and_nothing_secret_in_the_url(browser, served, tmp_path):
    page = browser.new_page()
    bodies: list[dict] = []
    urls: list[str] = []

    def seen(r):
        urls.append(r.url)
        if r.url.endswith("/v1/chat/completions"):
            bodies.append(json.loads(r.post_data))

    page.on("request", seen)
    page.goto(served + "/")
    page.wait_for_selector(".msg.error")  # no key yet: the page says the server needs one
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelector('#model').value === 'text'")
    # the picker: the served model selectable, catalog names listed disabled with the command that serves them
    page.wait_for_selector("#model optgroup", state="attached")
    served_opts = page.eval_on_selector_all("#model > option", "os => os.map(o => [o.value, o.disabled])")
    hints = page.eval_on_selector_all("#model optgroup option", "os => os.map(o => [o.textContent, o.disabled])")
    assert served_opts == [["text", False]]
    assert any(t.startswith("phi3.5 ") and "slm serve phi3.5" in t and off for t, off in hints)
    assert all(off for _, off in hints) and not any(t.startswith("text ") for t, _ in hints)

    # settings reach the request; the streamed answer is the server's answer to that request
    page.click("#toggle")
    page.fill("#system", "Answer briefly.")
    for field, value in (("#temp", "0"), ("#max", "8"), ("#top_p", "0.9"), ("#seed", "42")):
        page.fill(field, value)
    ask(page, "Hello there")
    answered(page, 1)
    body = bodies[-1]
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "Hello there"}]
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["seed"]) == (0, 8, 0.9, 42)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    again = httpx.post(served + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH, timeout=120)
    assert again.status_code == 200, again.text
    reply = again.json()
    first = page.locator(".msg.assistant").last
    assert first.get_attribute("data-text") == reply["choices"][0]["message"]["content"]
    n = reply["usage"]["completion_tokens"]
    assert re.fullmatch(rf"{n} tokens · [\d.]+ s · [\d.]+ tok/s", first.locator(".stats").inner_text())

    # stop mid-answer: a long answer (min_tokens added on the way, so the tiny model cannot end it early)
    long = [7900]  # read when each request goes out (unroute() may still see a request through the handler)
    page.route("**/v1/chat/completions", lambda route: route.continue_(
        post_data=json.dumps({**json.loads(route.request.post_data), **({"min_tokens": long[0]} if long else {})})))
    page.fill("#max", "7900")
    generated = _generated(served)
    # the user presses Stop as soon as some of the answer is shown (an observer in the page: no round trip)
    page.evaluate("""() => new MutationObserver((_, obs) => {
        const a = document.querySelectorAll('.msg.assistant')[1];
        if (a && (a.dataset.text || '').length > 20) { obs.disconnect(); document.getElementById('stop').click(); }
      }).observe(document.getElementById('log'), {subtree: true, childList: true, attributes: true})""")
    ask(page, "Tell me a long story")
    answered(page, 2)
    stopped = page.locator(".msg.assistant").nth(1)
    shown = stopped.get_attribute("data-text")
    assert stopped.get_attribute("data-done") == "stopped" and len(shown) > 20
    time.sleep(1.0)
    assert stopped.get_attribute("data-text") == shown  # it stopped growing
    assert re.fullmatch(r"stopped · \d+ tokens · [\d.]+ s · [\d.]+ tok/s", stopped.locator(".stats").inner_text())
    assert bodies[-1]["max_tokens"] == 7900
    # the server saw the disconnect: nothing runs any more. Waits up to 30 s so that the token count below
    # says how far a missed cut ran. (A cut that landed while a chunk was being written once left the job
    # running all 7900 tokens, until the garbage collector closed its generator: test_disconnect.py.)
    for _ in range(300):
        if httpx.get(served + "/health", headers=AUTH).json()["running"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stopped request still runs on the server")
    assert _generated(served) - generated < 1000  # the server cut it short (it makes ~300 tok/s here)
    long.clear()
    page.fill("#max", "4")
    t = time.perf_counter()
    ask(page, "Short one")
    answered(page, 3, timeout=30_000)  # one slot: only served because the stopped answer freed it
    errors = page.locator(".msg.error").all_inner_texts()
    assert time.perf_counter() - t < 30 and not errors, errors  # (the no-key note went once the key worked)
    assert [m["role"] for m in bodies[-1]["messages"]] == ["system", "user", "assistant", "user", "assistant",
                                                          "user"]
    assert bodies[-1]["messages"][4]["content"] == shown  # the stopped answer's part stays in the history

    # reload: the key stays in this tab's sessionStorage only; no URL ever carried it
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'text'")
    assert page.url == served + "/" and page.input_value("#key") == KEY
    assert page.evaluate("JSON.stringify(localStorage)") == "{}"
    page.goto(served + "/?api_key=" + KEY + "#frag")
    page.wait_for_function("location.search === '' && location.hash === ''")
    assert page.url == served + "/"
    assert not [u for u in urls if KEY in u and "api_key=" not in u]  # (only the URL this test typed)
    png = tmp_path / "chat.png"
    assert png.exists() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.close()


ANSWER = ("Here is code:\n\n```python\nprint('<b>hi</b>')\nx = 1 < 2\n```\n\nAnd **bold**, `inline`, "
          "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> "
          "<a href=\"javascript:window.__pwned=3\">link</a>")


def _sse(text: str, size: int = 7) -> str:
    """The answer as an OpenAI stream, a few characters per event (fences arrive in pieces)."""
    events = [{"choices": [{"index": 0, "delta": {"content": text[i:i + size]}}]} for i in range(0, len(text), size)]
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(events)}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_markdown_is_rendered_and_model_output_is_never_html(browser, served):
    page = browser.new_page()
    page.add_init_script(f"sessionStorage.setItem('slmkit-key', {json.dumps(KEY)})")  # as typed before a reload
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=_sse(ANSWER)))
    page.goto(served + "/")
    page.wait_for_function("document.querySelector('#model').value === 'text'")
    ask(page, "Show me some code")
    answered(page, 1)
    msg = page.locator(".msg.assistant")
    code = msg.locator("pre > code.language-python")
    assert code.count() == 1 and code.inner_text() == "print('<b>hi</b>')\nx = 1 < 2"
    assert msg.locator("strong").inner_text() == "bold" and msg.locator(":not(pre) > code").inner_text() == "inline"
    assert msg.locator("script, img, a, b").count() == 0  # model output made no element of its own
    assert page.evaluate("window.__pwned") is None
    text = msg.inner_text()
    assert "<script>window.__pwned = 1</script>" in text and 'onerror="window.__pwned = 2"' in text
    assert msg.get_attribute("data-text") == ANSWER
    page.close()
