"""A seeded generator of request bodies from JSON schemas (the server's OpenAPI document): bodies
shaped as the schema says with random values, then mutated: wrong types, missing or unknown
fields, huge and non-finite numbers, deep nesting, lone surrogates, broken JSON."""
from __future__ import annotations

import copy
import json
import random
from typing import Any

HUGE_INT = "__huge_int__"  # replaced by an integer of 5000 digits once serialized (json.dumps cannot)
STRINGS = ["", "hi", "Hello, world.", "tiny", "\u00e9\u4e2d\U0001f600", "\ud800", "a\udfffb", "<|end|>", "{", "5m",
           "json", "0", "-1", "1" * 30, "x" * 2000, "data:image/png;base64,AAAA", "http://example.com/a.png",
           "\x00\x1b", "\u00b2", " 12 ", "auto", "none", "required", "function", "user", "assistant"]
INTS = [0, 1, 2, 3, -1, -2, 7, 20, 21, 64, 65, 2**31, 2**63, -2**63, 10**30]
# numbers that drive the logits to inf (a temperature or repetition_penalty of 1e-45) are left out:
# the sampler's NaN handling belongs to the batch engine's own fix and tests
NUMBERS = [0, 0.0, -0.0, 0.5, 1, 1.0, 1.5, 2, -1, -2.5, 0.01, 99.9, 100, 101, 1e308, -1e308]


# plausible values by field name, so a shaped body is often valid and reaches the model
LIKELY: dict[str, list] = {
    "keep_alive": ["5m", "30s", -1, 3600, "1h30m"], "content": ["Hello", "Say something.", "\u00e9t\u00e9 \u4e2d", ""],
    "prompt": ["Once upon", "Hello", "1 2 3"], "system": ["Be brief."], "stop": ["\n", ["!", "."]],
    "name": ["ping", "get_weather"], "description": ["Ping a host"], "url": ["data:image/png;base64,AAAA"],
    "arguments": ['{"n": 1}', {"n": 1}], "format": ["json", {"type": "object"}],
    "messages": [[{"role": "user", "content": "Hello"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}],
                 [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                 [{"role": "user", "content": "Ping it."}, {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": '{"n": 1}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "pong"}]],
    "tools": [[{"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]],
}


def deep(n: int) -> Any:
    v: Any = []
    for _ in range(n):
        v = [v]
    return v


WRONG = [None, True, False, 0, -1, 1.5, "x", "", "\ud800", [], {}, [1], ["a"], {"a": 1}, {"type": "text"},
         deep(150), 2**64, -2**63 - 1, 1e308, HUGE_INT]
BROKEN = [b"", b"[]", b"5", b'"x"', b"null", b"{", b'{"model": ', b"\xff\xfe\x00", b"[" * 3000 + b"]" * 3000,
          b'{"prompt": "hi", "temperature": NaN}', b'{"a": Infinity}', b'{"a": 1' + b"0" * 5000 + b"}",
          b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}']


class BodyFuzzer:
    def __init__(self, seed: int, model: str):
        self.rng = random.Random(seed)
        self.model = model

    def value(self, schema: dict, name: str = "", depth: int = 0) -> Any:
        r = self.rng
        if name == "model" and r.random() < 0.85:
            return self.model
        if name in LIKELY and r.random() < (0.8 if depth <= 1 else 0.3):
            return copy.deepcopy(r.choice(LIKELY[name]))
        if "anyOf" in schema:
            return self.value(r.choice(schema["anyOf"]), name, depth)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return r.choice(schema["enum"])
        kind = schema.get("type")
        if kind == "object":
            props, required = schema.get("properties", {}), set(schema.get("required", ()))
            out = {k: self.value(s, k, depth + 1) for k, s in props.items()
                   if k in required or r.random() < (0.2 if depth == 0 else 0.4)}
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and r.random() < 0.7:
                out.update({r.choice(["1", "5", "13", "Hello", " 7 "]): self.value(extra) for _ in range(2)})
            if not props and r.random() < 0.5:  # a free-form object (a JSON schema, a tool's parameters)
                out = r.choice([{"type": "object"}, {"type": "string"}, {"type": "object", "properties": {
                    "n": {"type": "integer"}}, "required": ["n"]}, {"enum": [1, "a"]}, {"type": "nope"}])
            return out
        if kind == "array":
            n = r.choice([0, 1, 1, 2, 3])
            return [self.value(schema.get("items", {}), name, depth + 1) for _ in range(n)]
        if kind == "string":
            return r.choice(STRINGS)
        if kind == "integer":
            lo = int(schema.get("minimum", 0))
            return r.randint(lo, lo + 4) if r.random() < 0.6 else r.choice(INTS)
        if kind == "number":
            lo, hi = schema.get("minimum", 0), schema.get("maximum", 2)
            return r.uniform(lo, min(hi, lo + 2)) if r.random() < 0.6 else r.choice(NUMBERS)
        if kind == "boolean":
            return r.random() < 0.5
        return self.wrong()

    def wrong(self) -> Any:
        return copy.deepcopy(self.rng.choice(WRONG))  # a fresh copy: a later mutation must not make a cycle

    def _containers(self, v: Any) -> list[Any]:
        out, stack = [], [v]
        while stack:
            x = stack.pop()
            if isinstance(x, (dict, list)):
                out.append(x)
                stack.extend(x.values() if isinstance(x, dict) else x)
        return out

    def mutate(self, body: dict) -> dict:
        r = self.rng
        for _ in range(r.choice([0, 1, 1, 2, 3])):
            box = r.choice(self._containers(body))
            if isinstance(box, dict):
                if box and r.random() < 0.25:
                    del box[r.choice(list(box))]
                elif box and r.random() < 0.8:
                    box[r.choice(list(box))] = self.wrong()
                else:
                    box[r.choice(["unknown", "stream", "n", "seed", "images", "tools"])] = self.wrong()
            elif box:
                box[r.randrange(len(box))] = self.wrong()
            else:
                box.append(self.wrong())
        return body

    def body(self, schema: dict) -> bytes:
        """One request body for a route whose body follows `schema` (bytes: some are not JSON at all)."""
        r = self.rng
        if r.random() < 0.05:
            return r.choice(BROKEN)
        body = self.value(schema)
        if r.random() < 0.6:
            body = self.mutate(body)
        if isinstance(body, dict) and r.random() < 0.8:
            body.setdefault("max_tokens", r.randint(1, 8))  # most answers stay short
            body.setdefault("options", {"num_predict": r.randint(1, 8)})
        text = json.dumps(body)  # ensure_ascii: a lone surrogate travels as a \\ud800 escape
        return text.replace(json.dumps(HUGE_INT), "1" + "0" * 5000).encode()
