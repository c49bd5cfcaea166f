"""Structured output through llguidance: sampled outputs of a random tiny model always validate."""
from __future__ import annotations

import json
import re

import pytest

import slmkit
from slmkit import Generator, GeneratorParams, InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                   "verified": {"type": "boolean"}},
                  "required": ["city", "verified"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(phi3_folders):
    return slmkit.load(phi3_folders("gqa"), dtype="float32")


def test_fifty_sampled_outputs_validate_against_a_nested_schema(llm):
    msgs = [{"role": "user", "content": "Describe a pet as JSON."}]
    for seed in range(50):
        out = llm.chat(msgs, max_new_tokens=200, temperature=1.0, seed=seed, json_schema=SCHEMA)
        assert out.finish_reason == "stop", (seed, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_from_the_builtin_model():
    real = slmkit.load("builtin")  # real weights end their strings; a random tiny model rarely does
    for seed in range(3):
        out = real.generate("A JSON object describing a cat:", max_new_tokens=120, temperature=0.7, seed=seed,
                            response_format={"type": "json_object"})
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text


def test_response_format_regex_and_grammar(llm):
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "array", "items":
                                                                            {"type": "integer"}, "maxItems": 3}}}
    assert isinstance(json.loads(llm.generate("x", max_new_tokens=60, temperature=1.0, seed=2,
                                              response_format=schema).text), list)
    for seed in range(5):
        out = llm.generate("x", max_new_tokens=30, temperature=1.0, seed=seed, regex=r"[0-9]{3}-[a-c]{2}")
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", out.text), out.text
        out = llm.generate("x", max_new_tokens=30, temperature=1.0, seed=seed,
                           grammar='start: ("yes" | "no") " " ("please" | "thanks")')
        assert out.text in {"yes please", "yes thanks", "no please", "no thanks"}


def test_greedy_constrained_output_and_generator_rewind(llm):
    p = GeneratorParams(regex=r"(ab|cd){4}", max_new_tokens=40)
    gen = Generator(llm, p)
    gen.append_tokens(llm.tokenizer.encode("x"))
    while not gen.is_done():
        gen.generate_next_token()
    n = len(gen.get_sequence(0))
    text = llm.tokenizer.decode(gen.get_sequence(0)[2:])
    gen.rewind_to(3)  # step back into the middle: the grammar state steps back too
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == n
    assert llm.tokenizer.decode(gen.get_sequence(0)[2:]) == text
    assert re.fullmatch(r"(ab|cd){4}", text.strip()), text


@pytest.mark.parametrize("kw,param", [
    ({"json_schema": {"type": "nonsense"}}, "json_schema"), ({"json_schema": 5}, "json_schema"),
    ({"regex": "(unclosed"}, "regex"), ({"grammar": "start: ???"}, "grammar"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"regex": "a", "grammar": 'start: "a"'}, "grammar"),
])
def test_bad_grammars_are_named(llm, kw, param):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate("x", max_new_tokens=4, **kw)
    assert e.value.param == param
