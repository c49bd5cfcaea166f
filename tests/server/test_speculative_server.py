"""Speculative decoding through the server (the extension body fields speculative / num_draft) and
the CLI flags: the same greedy text as plain decoding and the same drafted / accepted counts as in
process, alone and as a row of continuous batching (OpenAI non-streamed and streamed, Ollama)."""
from __future__ import annotations

import json

import pytest

import slmkit
from tests.helpers.serving import start_server

httpx = pytest.importorskip("httpx")
KEY = "k"
PROMPT = "one two three four five six seven. one two three four five six seven. one two three"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("spec_srv"), "gqa"), dtype="float32")


def complete(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json=dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, **body))


def spec_usage(body: dict) -> tuple[int, int]:
    return body["usage"]["drafted_tokens"], body["usage"]["accepted_tokens"]


def stream_usage(base: str, **body) -> tuple[str, tuple[int, int]]:
    """A streamed completion's text and the drafted / accepted counts of its usage chunk."""
    text, usage = "", None
    with httpx.stream("POST", base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json=dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                stream_options={"include_usage": True}, **body)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    assert usage is not None
    return text, (usage["drafted_tokens"], usage["accepted_tokens"])


def ollama_usage(base: str) -> tuple[str, tuple[int, int]]:
    lines = httpx.post(base + "/api/generate", timeout=60, headers={"Authorization": f"Bearer {KEY}"}, json=dict(
        model="tiny", prompt=PROMPT, raw=True, stream=True,
        options=dict(num_predict=12, temperature=0, speculative="ngram", num_draft=5))).text.splitlines()
    last = json.loads(lines[-1])
    return "".join(json.loads(x)["response"] for x in lines), (last["drafted_tokens"], last["accepted_tokens"])


def test_single_stream_speculates_alone_and_as_a_batch_row(llm):
    """The same text as plain decoding, and the same drafted / accepted counts in process, through
    the server alone, and through it under continuous batching (non-streamed, streamed, Ollama)."""
    from slmkit.server.app import create_app

    want = llm.generate(PROMPT, max_new_tokens=12, temperature=0, speculative="ngram", num_draft=5)
    assert want.usage.drafted_tokens > 0
    counts = (want.usage.drafted_tokens, want.usage.accepted_tokens)
    base, srv, t = start_server(create_app({"tiny": llm}, api_key=KEY))
    try:
        plain = complete(base, speculative="none").json()
        spec = complete(base, speculative="ngram", num_draft=5).json()
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"] == want.text
        assert "drafted_tokens" not in plain["usage"]
        assert spec_usage(spec) == counts
        bad = complete(base, speculative="fast")
        assert bad.status_code == 400 and "speculative" in bad.text
    finally:
        srv.should_exit = True
        t.join(timeout=10)
    llm.enable_batching(slots=2, context=256)
    base, srv, t = start_server(create_app({"tiny": llm}, api_key=KEY))
    try:
        spec = complete(base, speculative="ngram", num_draft=5).json()
        assert spec["choices"][0]["text"] == want.text and spec_usage(spec) == counts
        assert stream_usage(base, speculative="ngram", num_draft=5) == (want.text, counts)
        assert ollama_usage(base) == (want.text, counts)
        auto = complete(base).json()  # "auto": a short prompt decodes plainly
        assert auto["choices"][0]["text"] == want.text and "drafted_tokens" not in auto["usage"]
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        llm.backend.batch.close()
        llm.backend.batch = None


def test_cli_flags_map_to_options(llm):
    from slmkit.cli import build_parser, generation_options

    a = build_parser().parse_args(["run", "m", "hi", "--speculative", "ngram", "--num-draft", "6"])
    opts = generation_options(a, raw=True)
    assert (opts.speculative, opts.num_draft, opts.draft) == ("ngram", 6, None)
    a = build_parser().parse_args(["run", "m", "hi", "--draft", "small"])
    opts = generation_options(a, raw=True, draft=llm)
    assert opts.speculative == "auto" and opts.draft is llm
    with pytest.raises(slmkit.InvalidRequestError) as e:
        generation_options(build_parser().parse_args(["run", "m", "hi", "--speculative", "draft"]), raw=True)
    assert e.value.param == "draft"
