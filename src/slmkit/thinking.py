"""Reasoning models (Phi-4-reasoning, Phi-4-mini-reasoning, DeepSeek-R1 style) think in
``<think>…</think>`` before they answer. A chat answer that opens with ``<think>`` has that block
moved out of ``text`` into ``reasoning`` (results and stream chunks alike); the tokens, usage and
max_tokens still count both. An answer that does not open with ``<think>`` is left as it is (a
stream holds back at most the few characters that could still begin the tag).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

OPEN, CLOSE = "<think>", "</think>"


class Splitter:
    """Feed the answer's text piece by piece; each feed returns (reasoning, content) to emit now."""

    def __init__(self) -> None:
        self.state = "start"  # start -> (think -> gap -> answer) | answer
        self.held = ""
        self.opened = False  # the answer opened a think block

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        if self.state == "start":
            lead = self.held.lstrip()
            if not lead or (len(lead) < len(OPEN) and OPEN.startswith(lead)):
                return "", ""  # could still open a think block
            if not lead.startswith(OPEN):
                self.state, out, self.held = "answer", self.held, ""
                return "", out
            self.state, self.held, self.opened = "think", lead[len(OPEN):], True
        if self.state == "think":
            at = self.held.find(CLOSE)
            if at < 0:  # emit all but a tail that could begin the closing tag
                keep = next((k for k in range(min(len(CLOSE) - 1, len(self.held)), 0, -1)
                             if CLOSE.startswith(self.held[-k:])), 0)
                out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return out, ""
            thought, self.held = self.held[:at], self.held[at + len(CLOSE):]
            self.state = "gap"
            return thought, self._after()
        return "", self._after()

    def _after(self) -> str:
        """The answer after the block, without the blank lines that separate them."""
        if self.state == "gap":
            self.held = self.held.lstrip()
            if not self.held:
                return ""
            self.state = "answer"
        out, self.held = self.held, ""
        return out

    def flush(self) -> tuple[str, str]:
        """What is held at the end: an unclosed think block stays reasoning (cut off by max_tokens)."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "think" else ("", held)


def split(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole answer."""
    s = Splitter()
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return (r1 + r2 if s.opened else None), c1 + c2


def apply(result: Any) -> Any:
    """A GenerationResult with its think block moved into result.reasoning."""
    reasoning, text = split(result.text)
    if reasoning is not None:
        result.reasoning, result.text = reasoning, text
    return result


def stream(chunks: Iterator[Any]) -> Iterator[Any]:
    """Chunks whose think-block text goes to chunk.reasoning and the rest to chunk.text."""
    s = Splitter()
    for c in chunks:
        r, t = s.feed(c.text)
        if c.finish_reason is not None:
            r2, t2 = s.flush()
            r, t = r + r2, t + t2
        c.text = t
        if r:
            c.reasoning = r
        yield c


_CONSTRAINTS = ("json_schema", "response_format", "regex", "grammar")
_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as structured.py's


def tags(tokenizer: Any) -> tuple[int, int] | None:
    """(id of <think>, id of </think>) when both are single tokens of the vocabulary (Phi-4-reasoning)."""
    ids = tokenizer.token_to_id(OPEN), tokenizer.token_to_id(CLOSE)
    return (ids[0], ids[1]) if None not in ids else None


def _answer_rule(name: str, value: Any) -> str | None:
    """The Lark rule `slm_answer` for one constraint option, or None where it cannot be wrapped."""
    if name == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("json_object", "json_schema"):
            return None
        spec = value.get("json_schema")
        value = {"type": "object"} if value["type"] == "json_object" else (
            spec.get("schema") if isinstance(spec, dict) else None)
        name = "json_schema"
    if name == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        return f"slm_answer: %json {json.dumps({'x-guidance': _STYLE, **value})}\n"
    if name == "regex" and isinstance(value, str):
        return "slm_answer: /" + value.replace("/", "\\/") + "/\n"
    if name == "grammar" and isinstance(value, str) and re.search(r"^start\s*:", value, re.M):  # Lark
        return re.sub(r"^start(\s*):", r"slm_answer\1:", value, count=1, flags=re.M) + "\n"
    return None


def after_thinking(tokenizer: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """kw with its structured-output option (json_schema, response_format, regex or a Lark grammar,
    tools' included) applying to the answer after an optional <think> block, for a model whose
    vocabulary has the think tags; kw as it was otherwise (a GBNF grammar is left as given)."""
    ids = tags(tokenizer)
    if ids is None:
        return kw
    opts = kw.get("options")  # a GenerationOptions (the server's, the CLI's) under the keywords
    merged = {k: getattr(opts, k, None) for k in _CONSTRAINTS}
    merged.update({k: kw[k] for k in _CONSTRAINTS if kw.get(k) is not None})
    given = [k for k in _CONSTRAINTS if merged[k] is not None]
    rule = _answer_rule(given[0], merged[given[0]]) if len(given) == 1 else None
    if rule is None:
        return kw
    grammar = (f"start: slm_think? slm_answer\nslm_think: <[{ids[0]}]> /(?s:.*)/ <[{ids[1]}]> /[ \\t\\r\\n]*/\n"
               + rule)
    out = {k: v for k, v in kw.items() if k not in _CONSTRAINTS}
    if opts is not None:
        out["options"] = opts.replace(**{k: None for k in _CONSTRAINTS})
    return {**out, "grammar": grammar}
