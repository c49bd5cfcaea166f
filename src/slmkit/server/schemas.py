"""JSON schemas of the request bodies, for the OpenAPI document (/openapi.json). The routes parse
their bodies by hand (so errors name the field in OpenAI's format); these schemas describe what
that parsing accepts, so schema-driven clients and fuzzers can exercise every route."""
from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_STOP = {"anyOf": [_STR, {"type": "array", "items": _STR, "maxItems": 4}]}
_KEEP_ALIVE = {"anyOf": [_STR, _NUM], "description": "Ollama: e.g. '5m', seconds, -1 (forever) or 0 (unload)"}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": _STR}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
               "properties": {"type": {"const": "image_url"},
                              "image_url": {"type": "object", "required": ["url"],
                                            "properties": {"url": _STR, "detail": _STR}}}}
_TOOL_CALL = {"type": "object", "properties": {
    "id": _STR, "type": {"const": "function"},
    "function": {"type": "object", "properties": {"name": _STR, "arguments": {"anyOf": [_STR, _OBJ]}}}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [_STR, {"type": "array", "items": {"anyOf": [_TEXT_PART, _IMAGE_PART]}},
                          {"type": "null"}]},
    "name": _STR, "tool_call_id": _STR, "tool_calls": {"type": "array", "items": _TOOL_CALL}}}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _STR, "description": _STR, "parameters": _OBJ}}}}
_TOOL_CHOICE = {"anyOf": [{"enum": ["auto", "none", "required"]},
                          {"type": "object", "required": ["type", "function"], "properties": {
                              "type": {"const": "function"},
                              "function": {"type": "object", "required": ["name"], "properties": {"name": _STR}}}}]}
_RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "required": ["schema"], "properties": {"name": _STR, "schema": _OBJ}}}}

_SPECULATIVE: dict[str, Any] = {  # extensions; usage then reports drafted_tokens / accepted_tokens
    "speculative": {"enum": ["auto", "none", "ngram"], "description": "prompt-lookup drafting (auto: long prompts)"},
    "num_draft": {"type": "integer", "minimum": 1, "maximum": 16, "description": "tokens drafted per pass"}}

_OPENAI_SAMPLING: dict[str, Any] = {
    "model": _STR,
    "max_tokens": {"type": "integer", "minimum": 1, "description": "at most the model's (slot) context"},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "typical_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "description": "negative: a random seed"},
    "stop": _STOP,
    "n": {"type": "integer", "minimum": 1, "maximum": 64},
    "logprobs": _BOOL,
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "token id (as a string) or text -> bias"},
    "min_tokens": {"type": "integer", "minimum": 0},
    "response_format": _RESPONSE_FORMAT,
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "num_ctx": {"type": "integer", "minimum": 1, "description": "this request's context (extra_body)"},
    "keep_alive": _KEEP_ALIVE,
    **_SPECULATIVE,
}

CHAT_COMPLETIONS = {"type": "object", "required": ["messages"], "properties": {
    **_OPENAI_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "num_crops": {"type": "integer", "minimum": 1, "maximum": 64,
                  "description": "HD crops per image, for a model that takes images (extra_body)"},
    "tools": {"type": "array", "minItems": 1, "items": _TOOL}, "tool_choice": _TOOL_CHOICE}}

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT = {"anyOf": [_STR, {"type": "array", "minItems": 1, "items": _STR}, _TOKEN_IDS,
                     {"type": "array", "minItems": 1, "items": _TOKEN_IDS}],
           "description": "a string, a list of strings, a list of token ids, or a list of token-id lists"}
COMPLETIONS = {"type": "object", "required": ["prompt"], "properties": {**_OPENAI_SAMPLING, "prompt": _PROMPT}}

_OLLAMA_OPTIONS = {"type": "object", "properties": {
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0}, "seed": _INT,
    "num_predict": {"type": "integer", "minimum": -2, "description": "-1 / -2: until the context is full"},
    "num_ctx": {"type": "integer", "minimum": 1}, "stop": _STOP,
    "repeat_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    "repeat_last_n": {"type": "integer", "minimum": 0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "typical_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, **_SPECULATIVE}}
_OLLAMA_COMMON = {"model": _STR, "stream": _BOOL, "keep_alive": _KEEP_ALIVE, "options": _OLLAMA_OPTIONS,
                  "format": {"anyOf": [{"const": "json"}, _OBJ]}}
_IMAGES = {"type": "array", "items": _STR, "description": "base64-encoded images"}
_OLLAMA_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": _STR, "images": _IMAGES,
    "tool_calls": {"type": "array", "items": _TOOL_CALL}}}

OLLAMA_CHAT = {"type": "object", "required": ["model"], "properties": {
    **_OLLAMA_COMMON, "messages": {"type": "array", "items": _OLLAMA_MESSAGE},
    "tools": {"type": "array", "items": _TOOL}}}

OLLAMA_GENERATE = {"type": "object", "required": ["model"], "properties": {
    **_OLLAMA_COMMON, "prompt": _STR, "system": _STR, "raw": _BOOL, "images": _IMAGES}}

OLLAMA_SHOW = {"type": "object", "properties": {"model": _STR, "name": _STR}}

_TEXTS = {"type": "array", "items": _STR}
EMBEDDINGS = {"type": "object", "required": ["input"], "properties": {
    "model": _STR, "keep_alive": _KEEP_ALIVE,
    "input": {"anyOf": [_STR, {"type": "array", "minItems": 1, "maxItems": 2048, "items": _STR}, _TOKEN_IDS,
                        {"type": "array", "minItems": 1, "maxItems": 2048, "items": _TOKEN_IDS}],
              "description": "a string, a list of strings, a list of token ids, or a list of token-id lists"},
    "encoding_format": {"enum": ["float", "base64"]},
    "dimensions": {"type": "integer", "minimum": 1, "description": "refused unless the model's own size"},
    "user": _STR}}
OLLAMA_EMBED = {"type": "object", "required": ["model"], "properties": {
    "model": _STR, "keep_alive": _KEEP_ALIVE, "input": {"anyOf": [_STR, _TEXTS]},
    "truncate": {**_BOOL, "description": "cut inputs longer than the context (default true)"},
    "dimensions": {"type": "integer", "minimum": 1}, "options": _OBJ}}
OLLAMA_EMBEDDINGS = {"type": "object", "required": ["model"], "properties": {
    "model": _STR, "keep_alive": _KEEP_ALIVE, "prompt": _STR, "options": _OBJ}}


def body(schema: dict) -> dict:
    """openapi_extra for a route whose JSON body follows `schema`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
