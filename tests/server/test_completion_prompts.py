"""/v1/completions takes every prompt form the OpenAI API reference allows (a string, a list of
strings, a list of token ids, a list of token-id lists), each prompt with its n choices numbered
prompt_index * n + i, streamed or not, with the official openai client and raw httpx."""
from __future__ import annotations

import json

import pytest

import slmkit
from tests.helpers.serving import start_server, stop_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

IDS = [5, 17, 42, 9]
PROMPTS = ["Hello", "Once upon a time"]
GREEDY = {"max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module", params=["serial", "batched"])
def served(request, tmp_path_factory):
    from slmkit.server.app import create_app
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path_factory.mktemp("prompts"), "gqa", max_position_embeddings=2048)
    llm = slmkit.load(folder, dtype="float32")
    if request.param == "batched":
        llm.enable_batching(slots=4, context=256)
    solo = slmkit.load(folder, dtype="float32")  # the answers to compare with, outside the server
    base, srv, t = start_server(create_app({"tiny": llm}, api_key="k"))
    yield base, solo
    stop_server(srv, t)


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)


def expect(solo, prompt):
    return solo.generate(prompt, max_new_tokens=4, temperature=0)


def post(base, body):
    return httpx.post(base + "/v1/completions", json={"model": "tiny", **body},
                      headers={"Authorization": "Bearer k"}, timeout=60)


def stream_choices(base, body):
    """index -> text, and the usage event, of a streamed completion (raw SSE)."""
    texts, usage = {}, None
    with httpx.stream("POST", base + "/v1/completions", json={"model": "tiny", "stream": True, **body},
                      headers={"Authorization": "Bearer k"}, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in map(json.loads, events[:-1]):
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        usage = e.get("usage") or usage
    return texts, usage


@pytest.mark.parametrize("prompt", [IDS, [IDS, IDS[:2]]], ids=["ids", "id-lists"])
def test_token_id_prompts_go_to_the_model_as_they_are(served, prompt):
    base, solo = served
    r = client(base).completions.create(model="tiny", prompt=prompt, **GREEDY)
    prompts = prompt if isinstance(prompt[0], list) else [prompt]
    assert [c.text for c in r.choices] == [expect(solo, p).text for p in prompts]
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_a_list_of_strings_gets_n_choices_per_prompt_numbered_as_openai_does(served):
    base, solo = served
    r = client(base).completions.create(model="tiny", prompt=PROMPTS, n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [expect(solo, p) for p in PROMPTS]
    assert [c.text for c in r.choices] == [want[0].text] * 2 + [want[1].text] * 2
    assert r.usage.prompt_tokens == sum(w.usage.prompt_tokens for w in want)  # each prompt once
    assert r.usage.completion_tokens == 2 * sum(w.usage.completion_tokens for w in want)


@pytest.mark.parametrize("prompt", [PROMPTS, [IDS, IDS[:2]]], ids=["strings", "id-lists"])
def test_several_prompts_stream_with_their_own_indices_and_one_usage(served, prompt):
    base, solo = served
    texts, usage = stream_choices(base, {"prompt": prompt, "n": 2, "stream_options": {"include_usage": True},
                                         **GREEDY})
    want = [expect(solo, p) for p in prompt]
    assert texts == {0: want[0].text, 1: want[0].text, 2: want[1].text, 3: want[1].text}
    assert usage["prompt_tokens"] == sum(w.usage.prompt_tokens for w in want)
    assert usage["completion_tokens"] == 2 * sum(w.usage.completion_tokens for w in want)


def test_the_official_client_streams_a_token_id_prompt(served):
    base, solo = served
    chunks = client(base).completions.create(model="tiny", prompt=IDS, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect(solo, IDS).text


@pytest.mark.parametrize("prompt", [[], [[]], ["a", 1], [1.5], [True, 2], [-1], [[1], 2], {"text": "a"}, 7,
                                    [IDS, [10**9]], [10**9], ["Hi", ""], ""],
                         ids=["empty", "empty-ids", "mixed", "float", "bool", "negative", "ragged", "object",
                              "int", "out-of-vocab-2nd", "out-of-vocab", "empty-2nd", "empty-string"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_is_a_400_naming_prompt(served, prompt, stream):
    r = post(served[0], {"prompt": prompt, "stream": stream, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
