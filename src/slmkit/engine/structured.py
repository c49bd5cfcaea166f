"""Constrained decoding (JSON schema, regex, Lark / GBNF grammar) through llguidance, the engine
ONNX Runtime GenAI and llama.cpp use: at each step a token mask from the grammar's state, after
each token the state advances. The output always matches the grammar when it finishes by itself
(finish_reason "stop"); a length limit can still cut it short.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import InvalidRequestError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LLTOK: dict[int, Any] = {}  # id(Tokenizer) -> (Tokenizer, LLTokenizer): building one costs ~1 s


def _import():
    try:
        import llguidance
    except ImportError:
        raise InvalidRequestError("structured output needs the llguidance package (pip install 'slmkit[structured]')",
                                  param="response_format") from None
    return llguidance


def grammar_for(*, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                response_format: Any = None) -> tuple[str, str] | None:
    """(llguidance grammar, the option it came from) for at most one of the options, or None."""
    given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                 ("response_format", response_format)) if v is not None]
    if not given:
        return None
    ll = _import()
    if len(given) > 1:
        raise InvalidRequestError(f"give one of json_schema, regex, grammar, response_format; got "
                                  f"{', '.join(k for k, _ in given)}", param=given[1][0])
    name, value = given[0]
    if name == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequestError("must be {'type': 'text' | 'json_object' | 'json_schema', ...}", param=name)
        if value["type"] == "text":
            return None
        if value["type"] == "json_object":
            value = {"type": "object"}
        else:
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise InvalidRequestError("json_schema.schema must be a JSON schema object", param=name)
            value = spec["schema"]
        name = "response_format"
        kind = "json_schema"
    else:
        kind = name
    try:
        if kind == "json_schema":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise InvalidRequestError("must be a JSON schema object", param=name)
            # one-line JSON with ", " and ": " (no runs of free whitespace, which small models
            # can emit forever); a schema's own "x-guidance" options take precedence
            text = ll.LLMatcher.grammar_from_json_schema(value, defaults=JSON_STYLE)
        elif kind == "regex":
            if not isinstance(value, str):
                raise InvalidRequestError("must be a string", param=name)
            text = ll.LLMatcher.grammar_from_regex(value)
        else:
            if not isinstance(value, str):
                raise InvalidRequestError("must be a Lark or GBNF grammar string", param=name)
            text = ll.grammar_from("grammar", value)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"invalid {kind}: {e}", param=name) from None
    error = ll.LLMatcher.validate_grammar(text)
    if error:
        raise InvalidRequestError(f"invalid {kind}: {error}", param=name)
    return text, name


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> Any:
    ll = _import()
    key = id(tokenizer)
    hit = _LLTOK.get(key)
    if hit is None or hit[0] is not tokenizer:
        lt = ll.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
        _LLTOK[key] = hit = (tokenizer, lt)
    return hit[1]


class Constraint:
    """One sequence's grammar state: mask() before sampling, advance() after."""

    def __init__(self, grammar: str, option: str, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]):
        ll = _import()
        self.option = option
        self.vocab_size = vocab_size
        self.matcher = ll.LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"grammar rejected: {self.matcher.get_error()}", param=option)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] with every token the grammar forbids at -inf."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[: logits.shape[-1]]
        if allowed.numel() < logits.shape[-1]:
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.numel()))
        if not allowed.any():
            raise InvalidRequestError(f"the grammar allows no token here ({self.matcher.get_error() or 'dead end'})",
                                      param=self.option)
        return logits.masked_fill(allowed.view(1, -1) == 0, float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token) and self.matcher.is_error():
            raise InvalidRequestError(f"token {token} breaks the grammar: {self.matcher.get_error()}",
                                      param=self.option)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()
