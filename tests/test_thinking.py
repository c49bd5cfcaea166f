"""Reasoning kept apart and Phi-4-mini's native tool format, through the Python API on tiny Phi-4 folders."""
from __future__ import annotations

import json

import pytest

import slmkit
from slmkit import tools as tooling
from slmkit.thinking import Splitter, split
from tests.helpers.tiny_models import make_phi4_folder

pytest.importorskip("llguidance")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}]
ASK = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return slmkit.load(make_phi4_folder(tmp_path_factory.mktemp("mini"), "phi4-mini"), dtype="float32")


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    return slmkit.load(make_phi4_folder(tmp_path_factory.mktemp("phi4"), "phi4"), dtype="float32")


@pytest.mark.parametrize("text, want", [
    ("<think>a b</think>\n\nAnswer", ("a b", "Answer")), ("Hello <think>x</think>", (None, "Hello <think>x</think>")),
    ("  <think>cut off", ("cut off", "")), ("<thi", (None, "<thi")), ("", (None, "")),
])
def test_split_whole_and_piecewise_agree(text, want):
    assert split(text) == want
    for size in (1, 2, 3):  # fed in pieces, the same reasoning and answer come out
        s, parts = Splitter(), [text[i:i + size] for i in range(0, len(text), size)]
        outs = [s.feed(p) for p in parts] + [s.flush()]
        assert ("".join(r for r, _ in outs) or None if want[0] is None else "".join(r for r, _ in outs)) == want[0]
        assert "".join(c for _, c in outs) == want[1]


def test_native_tool_prompt_and_required_call(mini):
    prompt = mini.render(tooling.prepare(ASK, TOOLS, "auto", tooling.native_format(mini.tokenizer))[0])
    assert prompt.text.startswith('<|system|>You are helpful.<|tool|>[{"name": "get_weather"')
    assert prompt.text.endswith("<|/tool|><|end|><|user|>Weather in Paris?<|end|><|assistant|>")
    r = mini.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60, temperature=0)
    open_id = mini.tokenizer.token_to_id("<|tool_call|>")
    assert r.finish_reason == "tool_calls" and r.token_ids[0] == open_id and r.text == ""
    assert [c.name for c in r.tool_calls] == ["get_weather"]
    assert isinstance(r.tool_calls[0].arguments["city"], str) and len(r.tool_calls[0].arguments["city"]) <= 12
    chunks = list(mini.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
    assert chunks[-1].tool_calls[0].arguments == r.tool_calls[0].arguments


def test_native_tool_history_renders_calls_in_tags(mini):
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = mini.render(tooling.prepare(msgs, TOOLS, "auto", tooling.native_format(mini.tokenizer))[0]).text
    assert '<|assistant|><|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>' in text
    assert "<|tool|>sunny<|end|>" in text


def test_models_without_native_format_keep_the_system_prompt_route(phi4):
    assert tooling.native_format(phi4.tokenizer) is None


def test_reasoning_apart_and_schema_after_thinking(phi4):
    think, end = phi4.tokenizer.token_to_id("<think>"), phi4.tokenizer.token_to_id("</think>")
    bias = {think: 100.0, end: 8.0}  # think first; close the block soon
    r = phi4.chat([{"role": "user", "content": "Hi"}], json_schema=SCHEMA, logit_bias=bias, max_new_tokens=60,
                  temperature=0)
    assert r.token_ids[0] == think and end in r.token_ids
    assert r.reasoning is not None and "<think>" not in r.text and "</think>" not in r.text
    assert isinstance(json.loads(r.text)["n"], int)  # the schema held for the answer after the thinking
    assert r.usage.completion_tokens == len(r.token_ids)  # max_tokens counts the thinking too
    chunks = list(phi4.chat([{"role": "user", "content": "Hi"}], json_schema=SCHEMA, logit_bias=bias,
                            max_new_tokens=60, temperature=0, stream=True))
    assert "".join(c.reasoning or "" for c in chunks) == r.reasoning
    assert "".join(c.text for c in chunks) == r.text


def test_plain_answers_have_no_reasoning(mini):
    r = mini.chat(ASK, max_new_tokens=8, temperature=0)
    assert r.reasoning is None and len(r.token_ids) == 8


class _Tty:
    def __init__(self, tty: bool):
        self.parts: list[str] = []
        self.tty = tty

    def write(self, s: str) -> None:
        self.parts.append(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, hide", [(True, False), (False, False), (True, True)])
def test_cli_dims_or_hides_the_thinking(tty, hide):
    from slmkit.cli import parse_args
    from slmkit.cli_repl import DIM, write_chunk
    from slmkit.results import GenerationChunk

    out, state = _Tty(tty), {}
    for c in (GenerationChunk("", [1], reasoning="Let me see."), GenerationChunk("Hi", [2])):
        write_chunk(c, out, hide, state)
    text = "".join(out.parts)
    assert text.endswith("Hi") and ("Let me see." in text) != hide and (DIM in text) == (tty and not hide)
    assert parse_args(["run", "m", "hi", "--hide-thinking"]).hide_thinking
