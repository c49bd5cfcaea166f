"""Tool calling: calls always parse and match the tool's schema; results render back as turns."""
from __future__ import annotations

import json

import pytest

import slmkit
from slmkit import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    # the tool listing is long for the tiny tokenizer: a context of 2048
    folder = make_phi3_folder(tmp_path_factory.mktemp("phi3-tools"), "gqa", max_position_embeddings=2048)
    return slmkit.load(folder, dtype="float32")


def test_required_and_named_calls_always_validate(llm):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for seed in range(10):
        out = llm.chat(MSGS, tools=[WEATHER, ADD], tool_choice="required", max_new_tokens=120, temperature=1.0,
                       seed=seed)
        assert out.finish_reason == "tool_calls", out.text
        (call,) = out.tool_calls
        jsonschema.validate(call.arguments, schemas[call.name])
        assert json.loads(call.arguments_json) == call.arguments and call.id.startswith("call_")
    out = llm.chat(MSGS, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
                   max_new_tokens=120, temperature=1.0, seed=3)
    assert out.tool_calls[0].name == "add"


def test_auto_gives_text_or_a_valid_call_and_none_gives_text(llm):
    kinds = set()
    for seed in range(12):
        out = llm.chat(MSGS, tools=[WEATHER], max_new_tokens=60, temperature=1.0, seed=seed)
        if out.tool_calls:
            kinds.add("call")
            jsonschema.validate(out.tool_calls[0].arguments, WEATHER["function"]["parameters"])
        else:
            kinds.add("text")
            assert not out.text.lstrip().startswith("{") or out.finish_reason == "length"
    assert kinds  # (which kinds a random model picks is up to it)
    out = llm.chat(MSGS, tools=[WEATHER], tool_choice="none", max_new_tokens=10, temperature=0)
    assert out.tool_calls is None


def test_tool_results_render_into_the_conversation(llm):
    msgs = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 C, sunny"}]
    from slmkit import tools

    rendered, _ = tools.prepare(msgs, [WEATHER], "auto")
    text = llm.render(rendered).text
    assert '"name": "get_weather"' in text and "21 C, sunny" in text and "get_weather" in rendered[0]["content"]
    out = llm.chat(msgs, tools=[WEATHER], max_new_tokens=8, temperature=0)
    assert out.finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kw,param", [
    ({"tools": []}, "tools"), ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "stream": True, "n": 2}, "n"),
])
def test_bad_tool_requests_are_named(llm, kw, param):
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(MSGS, max_new_tokens=4, **kw)
    assert e.value.param == param


def test_streamed_tool_call_ends_with_the_parsed_call(llm):
    whole = llm.chat(MSGS, tools=[WEATHER], tool_choice="required", max_new_tokens=200, temperature=0)
    chunks = list(llm.chat(MSGS, tools=[WEATHER], tool_choice="required", max_new_tokens=200, temperature=0,
                           stream=True))
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.tool_calls for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == whole.finish_reason
    assert whole.tool_calls and [(t.name, t.arguments) for t in chunks[-1].tool_calls or []] == \
        [(t.name, t.arguments) for t in whole.tool_calls or []]
