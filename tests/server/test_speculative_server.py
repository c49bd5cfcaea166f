"""Speculative decoding through the server (the extension body fields speculative / num_draft) and
the CLI flags: the same greedy text as plain decoding, usage with drafted / accepted tokens, and the
continuous-batching path refusing an explicit speculative mode by name."""
from __future__ import annotations

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


def test_single_stream_speculates_and_batch_rows_refuse_by_name(llm):
    from slmkit.server.app import create_app

    base, srv, t = start_server(create_app({"tiny": llm}, api_key=KEY))
    try:
        plain = complete(base, speculative="none").json()
        spec = complete(base, speculative="ngram", num_draft=5).json()
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
        assert "drafted_tokens" not in plain["usage"]
        assert spec["usage"]["drafted_tokens"] >= spec["usage"]["accepted_tokens"] >= 0
        assert spec["usage"]["drafted_tokens"] > 0
        bad = complete(base, speculative="fast")
        assert bad.status_code == 400 and "speculative" in bad.text
    finally:
        srv.should_exit = True
        t.join(timeout=10)
    llm.enable_batching(slots=2, context=256)
    base, srv, t = start_server(create_app({"tiny": llm}, api_key=KEY))
    try:
        refused = complete(base, speculative="ngram")
        assert refused.status_code == 400 and "speculative" in refused.text and "batching" in refused.text
        auto = complete(base).json()  # "auto" decodes plainly in a batch step
        assert auto["choices"][0]["text"] == plain["choices"][0]["text"]
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
