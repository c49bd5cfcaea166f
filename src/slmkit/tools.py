"""OpenAI-style tool calling for models whose chat template has no tool support (Phi-3 / 3.5):
the tools are described in the system message, the answer is constrained by a grammar so a call is
always a valid JSON object {"name": ..., "arguments": {...}} matching that tool's parameter schema,
and a call comes back as structured ToolCalls (finish_reason "tool_calls").

tool_choice: "auto" (free text, or a call when the answer starts with "{"), "none" (free text),
"required" (some call), or {"type": "function", "function": {"name": ...}} (that call).

Models with a native format (Phi-4-mini: a template that takes the tools as `<|tool|>[...]<|/tool|>`
in the system turn, a vocabulary with `<|tool_call|>` / `<|/tool_call|>`) get the tools in that form
instead, and answer `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]<|/tool_call|>`, which the
grammar keeps valid; those tags are tokens, so the call is told apart from text by its token ids.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

INSTRUCTIONS = ("You can call tools. To call one, answer with only a JSON object of the form "
                '{"name": <tool name>, "arguments": {<arguments>}} and nothing else. '
                "Otherwise answer normally. The tools:\n")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def _functions(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, (list, tuple)) or not tools:
        raise InvalidRequestError("must be a non-empty list of tools", param="tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) and t.get("type", "function") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError("must be {'type': 'function', 'function': {'name': ..., 'parameters': "
                                      "{...}}}", param=f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise InvalidRequestError("parameters must be a JSON schema object", param=f"tools[{i}].function")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": dict(params)})
    if len({f["name"] for f in out}) != len(out):
        raise InvalidRequestError("tool names must be unique", param="tools")
    return out


def _call_schema(fns: list[dict[str, Any]]) -> dict[str, Any]:
    options = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _text_of(content: Any) -> str:
    """A message's text: the string, or the text parts of a list of parts."""
    if isinstance(content, (list, tuple)):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return content or ""


def _as_text_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls and tool results as plain text turns (templates without tool roles)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") if isinstance(c, Mapping) else None
                if not isinstance(fn, Mapping):
                    raise InvalidRequestError("must be {'function': {'name': ..., 'arguments': ...}}",
                                              param=f"messages[{i}].tool_calls[{j}]")
                args = fn.get("arguments", {})
                try:
                    args = json.loads(args) if isinstance(args, str) and args.strip() else args
                    calls.append(json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False))
                except (ValueError, RecursionError) as e:  # bad JSON, too deep, or too many digits
                    raise InvalidRequestError(f"is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                                              param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
            m = {"role": "assistant", "content": (_text_of(m.get("content")) + "\n".join(calls)).strip()}
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"Tool result{' (' + m['name'] + ')' if m.get('name') else ''}: "
                                            f"{m.get('content') or ''}"}
        out.append(m)
    return out


NATIVE_OPEN, NATIVE_CLOSE = "<|tool_call|>", "<|/tool_call|>"


def native_format(tokenizer: Any) -> tuple[int, int] | None:
    """(id of <|tool_call|>, id of <|/tool_call|>) when the model's template takes tools natively
    (Phi-4-mini's `<|tool|>` in the system turn) and its vocabulary has the call tags; else None."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "<|tool|>" not in template or "tools" not in template:
        return None
    ids = tokenizer.token_to_id(NATIVE_OPEN), tokenizer.token_to_id(NATIVE_CLOSE)
    return (ids[0], ids[1]) if None not in ids else None


def _native_messages(messages: Sequence[Mapping[str, Any]], listing: str) -> list[dict[str, Any]]:
    """Earlier calls as <|tool_call|>[...]<|/tool_call|> turns, the tools on the system turn (tool
    results stay "tool" turns, which the template renders in its own tags)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [_call_obj(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
            m = {"role": "assistant", "content": _text_of(m.get("content")) + NATIVE_OPEN
                 + json.dumps(calls, ensure_ascii=False) + NATIVE_CLOSE}
        out.append(m)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["tools"] = listing
    else:
        out.insert(0, {"role": "system", "content": "", "tools": listing})
    return out


def _call_obj(c: Any, param: str) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c, Mapping) else None
    if not isinstance(fn, Mapping):
        raise InvalidRequestError("must be {'function': {'name': ..., 'arguments': ...}}", param=param)
    args = fn.get("arguments", {})
    try:
        args = json.loads(args) if isinstance(args, str) and args.strip() else args
    except (ValueError, RecursionError) as e:
        raise InvalidRequestError(f"is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                                  param=f"{param}.function.arguments") from None
    return {"name": fn.get("name"), "arguments": args}


def _prepare_native(messages: Sequence[Mapping[str, Any]], fns: list[dict], tool_choice: Any,
                    tags: tuple[int, int]) -> tuple[list[dict], dict]:
    chosen = fns
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise InvalidRequestError(f"names no tool of the request: {name!r}", param="tool_choice")
    elif tool_choice not in ("auto", "required", "none"):
        raise InvalidRequestError("must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                                  "{'name': ...}}", param="tool_choice")
    # a tool's declared arguments only, unless its schema says otherwise (clients such as ollama's drop
    # additionalProperties, and a model left free to add keys can ramble in one until max_tokens)
    chosen = [{**f, "parameters": {"additionalProperties": False, **f["parameters"]}}
              if isinstance(f["parameters"].get("properties"), Mapping) else f for f in chosen]
    calls = json.dumps({"type": "array", "items": _call_schema(chosen), "minItems": 1,  # one-line JSON
                        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}})
    call = f"call: <[{tags[0]}]> %json {calls} <[{tags[1]}]>\n"
    options: dict[str, Any] = {}
    if tool_choice == "auto":
        options = {"grammar": "start: call | text\n" + call + "text: /[\\s\\S]+/\n"}
    elif tool_choice != "none":
        options = {"grammar": "start: call\n" + call}
    listing = json.dumps(fns, ensure_ascii=False)
    return _native_messages(messages, listing), options


def prepare(messages: Sequence[Mapping[str, Any]], tools: Any, tool_choice: Any,
            native: tuple[int, int] | None = None) -> tuple[list[dict], dict]:
    """(messages with the tools described, generation options constraining the answer).
    native: the call tags' ids (native_format) for a model with its own tool format."""
    fns = _functions(tools)
    if native is not None:
        return _prepare_native(messages, fns, tool_choice or "auto", native)
    if tool_choice is None:
        tool_choice = "auto"
    options: dict[str, Any]  # json_schema (a dict) or grammar (a string)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise InvalidRequestError(f"names no tool of the request: {name!r}", param="tool_choice")
        options = {"json_schema": _call_schema(chosen)}
    elif tool_choice == "required":
        options = {"json_schema": _call_schema(fns)}
    elif tool_choice == "auto":
        schema = json.dumps(_call_schema(fns))
        options = {"grammar": f"start: call | text\ncall: %json {schema}\ntext: /[^{{][\\s\\S]*/\n"}
    elif tool_choice == "none":
        options = {}
    else:
        raise InvalidRequestError("must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                                  "{'name': ...}}", param="tool_choice")
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in fns)
    msgs = _as_text_messages(messages)
    if msgs and msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
        msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + INSTRUCTIONS + listing}
    else:
        msgs.insert(0, {"role": "system", "content": INSTRUCTIONS + listing})
    return msgs, options


def parse_native(text: str, token_ids: Sequence[int], tools: Any, tags: tuple[int, int]) -> list[ToolCall]:
    """The calls of a native-format answer: the JSON list after its <|tool_call|> token ([] when
    the answer has no call tag, or a list cut short by the length limit)."""
    if tags[0] not in token_ids:
        return []
    body = text.split(NATIVE_OPEN, 1)[-1].split(NATIVE_CLOSE, 1)[0].strip()  # tags absent when skipped
    try:
        items = json.loads(body)
    except (ValueError, RecursionError):
        return []
    names = {f["name"] for f in _functions(tools)}
    if not isinstance(items, list) or not all(isinstance(o, dict) and o.get("name") in names
                                              and isinstance(o.get("arguments"), dict) for o in items):
        return []
    return [ToolCall(f"call_{uuid.uuid4().hex[:24]}", o["name"], o["arguments"]) for o in items]


def with_native_calls(chunks: Iterator[Any], tools: Any, tags: tuple[int, int]) -> Iterator[Any]:
    """A chat stream in the native format: text as it comes until the <|tool_call|> token, then the
    call's text held back; the last chunk carries the parsed calls (finish_reason "tool_calls")."""
    held: list[str] | None = None
    ids: list[int] = []
    for c in chunks:
        ids.extend(c.token_ids)
        if held is None and tags[0] in c.token_ids:
            held = []
        if held is not None:
            held.append(c.text)
            c.text = ""
        if c.finish_reason is not None and held is not None:
            calls = parse_native("".join(held), ids, tools, tags)
            if calls:
                c.tool_calls, c.finish_reason = calls, "tool_calls"
            else:  # not a complete call (cut short): the text as it was
                c.text = "".join(held)
        yield c


def parse(text: str, tools: Any, tool_choice: Any) -> list[ToolCall]:
    """The tool call in a constrained answer ([] for a plain-text answer)."""
    if tool_choice == "none" or not text.lstrip().startswith("{"):
        return []
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # cut short by the length limit (or beyond what json reads): no call
        return []
    names = {f["name"] for f in _functions(tools)}
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments"), dict):
        return []
    return [ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], obj["arguments"])]


def with_tool_calls(chunks: Iterator[Any], tools: Any, tool_choice: Any) -> Iterator[Any]:
    """A chat stream whose last chunk carries the parsed tool call (finish_reason "tool_calls") when
    the text made one."""
    text = []
    for c in chunks:
        text.append(c.text)
        if c.finish_reason is not None:
            calls = parse("".join(text), tools, tool_choice)
            if calls:
                c.tool_calls, c.finish_reason = calls, "tool_calls"
        yield c


def chat_with_tools(llm: Any, messages: Any, tools: Any, tool_choice: Any, *, stream: bool,
                    num_crops: int | None, **kw: Any) -> Any:
    """LLM.chat with tools on a token-level backend: the model's own tool format where it has one
    (Phi-4-mini's <|tool|> / <|tool_call|>), else the tools described in the system prompt; a
    grammar keeps the call valid; the call comes back in tool_calls (streamed: on the last chunk)."""
    from . import thinking
    from .text.chat import normalize_messages

    native = native_format(llm.tokenizer)
    # the messages are checked first: the tools' rewrite of them assumes well-formed ones
    messages, constraint = prepare(normalize_messages(messages), tools, tool_choice, native)
    ids = llm.chat_prompt(messages, num_crops=num_crops)
    if stream:  # text chunks as they come; the last one carries the parsed call
        if kw.get("n") not in (None, 1):
            raise InvalidRequestError("streaming returns one sequence; use n with stream=False", param="n")
        chunks = thinking.stream(llm.generate(ids, stream=True, **thinking.after_thinking(
            llm.tokenizer, {**kw, **constraint})))
        if native is not None:
            return with_native_calls(chunks, tools, native)
        return with_tool_calls(chunks, tools, tool_choice)
    result = llm.generate(ids, **thinking.after_thinking(llm.tokenizer, {**kw, **constraint}))
    for r in result if isinstance(result, list) else [result]:  # n > 1: a list
        thinking.apply(r)
        calls = (parse_native(r.text, r.token_ids, tools, native) if native is not None
                 else parse(r.text, tools, tool_choice))
        if calls:
            r.tool_calls, r.finish_reason = calls, "tool_calls"
            if native is not None:
                r.text = ""
    return result
