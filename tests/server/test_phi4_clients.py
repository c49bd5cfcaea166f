"""Phi-4-mini's tool calls and a reasoning model's thinking through the official openai and ollama clients
against `slm serve` on tiny Phi-4 folders: structured tool_calls (streamed and not) equal to the Python API's,
reasoning_content / thinking on their own fields."""
from __future__ import annotations

import json

import pytest
import torch

import slmkit
from tests.helpers.serving import slm_serve
from tests.helpers.tiny_models import make_phi4_folder

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city", "enum": ["Paris", "Berlin"]}},
        "additionalProperties": False}}}]
# what the ollama client sends for TOOLS: it rebuilds tools through its own models, which drop
# additionalProperties (a different prompt; the native grammar still keeps the call to declared keys)
OLLAMA_TOOLS = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
    k: v for k, v in TOOLS[0]["function"]["parameters"].items() if k != "additionalProperties"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def make_tool_happy(folder) -> None:
    """Point the (tied) <|tool_call|> row at the last prompt position's final hidden state of ASK with
    TOOLS and with OLLAMA_TOOLS, so this random model opens a call there, as a tuned one would (tool_choice
    "auto", what Ollama sends)."""
    from safetensors.torch import load_file, save_file

    llm = slmkit.load(folder, dtype="float32")
    row = 0
    for tools in (TOOLS, OLLAMA_TOOLS):
        ids = llm.chat_prompt(tooling.prepare(ASK, tools, "auto", tooling.native_format(llm.tokenizer))[0])
        with torch.no_grad():
            h = llm.engine.model(torch.tensor([ids]), hidden=True)[0, -1]
        row = row + 40 * h / h.norm() ** 2
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"][llm.tokenizer.token_to_id("<|tool_call|>")] = row
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


from slmkit import tools as tooling  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4srv")
    mini = make_phi4_folder(root / "mini", "phi4-mini")
    make_tool_happy(mini)
    return mini, make_phi4_folder(root / "reason", "phi4")


@pytest.fixture(scope="module")
def base(folders):
    with slm_serve({"mini": folders[0], "reason": folders[1]}, "--dtype", "float32") as url:
        yield url


@pytest.fixture(scope="module")
def want(folders):
    r = slmkit.load(folders[0], dtype="float32").chat(ASK, tools=TOOLS, max_new_tokens=40, temperature=0)
    assert r.finish_reason == "tool_calls", "the tool-happy tiny model should call"
    return r.tool_calls


def test_openai_client_tool_calls_streamed_and_not(base, want):
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="mini", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == want[0].arguments
    name, args, finish = None, "", None
    for ev in client.chat.completions.create(model="mini", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0,
                                             stream=True):
        d = ev.choices[0].delta
        assert not d.content
        for tc in d.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
        finish = ev.choices[0].finish_reason or finish
    assert (name, json.loads(args), finish) == ("get_weather", want[0].arguments, "tool_calls")


def test_ollama_client_tool_calls(base, want):
    client = ollama.Client(host=base)
    r = client.chat(model="mini", messages=ASK, tools=TOOLS, options={"num_predict": 40, "temperature": 0})
    calls = r.message.tool_calls
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", want[0].arguments)]
    streamed = [c for part in client.chat(model="mini", messages=ASK, tools=TOOLS, stream=True,
                                          options={"num_predict": 40, "temperature": 0})
                for c in part.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("get_weather", want[0].arguments)]


def test_reasoning_on_its_own_fields(base, folders):
    llm = slmkit.load(folders[1], dtype="float32")
    think, end = llm.tokenizer.token_to_id("<think>"), llm.tokenizer.token_to_id("</think>")
    bias = {think: 100.0, end: 6.0}
    ref = llm.chat([{"role": "user", "content": "Hi"}], logit_bias=bias, max_new_tokens=24, temperature=0)
    assert ref.reasoning is not None and "<think>" not in ref.text
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    kw = dict(model="reason", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, temperature=0,
              logit_bias={str(k): v for k, v in bias.items()})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.model_extra["reasoning_content"] == ref.reasoning
    assert r.usage.completion_tokens == len(ref.token_ids)  # the thinking counts
    reasoning, content = "", ""
    for ev in client.chat.completions.create(**kw, stream=True):
        d = ev.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
    assert (reasoning, content) == (ref.reasoning, ref.text)


def test_ollama_chat_lines_put_thinking_apart():
    from slmkit.results import GenerationChunk, Timings, Usage
    from slmkit.server import ollama_api

    chunks = [GenerationChunk("", [1], reasoning="Let me "), GenerationChunk("", [2], reasoning="see."),
              GenerationChunk("", [3]), GenerationChunk("Hi", [4]),
              GenerationChunk("!", [5], finish_reason="stop", usage=Usage(3, 5), timings=Timings())]
    lines = [json.loads(b) for b in ollama_api.chat_lines(iter(chunks), "m", 0.0)]
    assert "".join(x["message"].get("thinking", "") for x in lines) == "Let me see."
    assert "".join(x["message"]["content"] for x in lines) == "Hi!"
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 5
