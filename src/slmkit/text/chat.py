"""Chat messages (OpenAI shape) -> prompt text via the model's Jinja chat template, rendered as transformers does.

The Jinja environment matches transformers' ``apply_chat_template``: ``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block that just renders its
body, the non-HTML-escaping ``tojson`` filter and the ``raise_exception``/``strftime_now`` globals. Template variables:
``messages``, ``add_generation_prompt``, ``tools`` (None), ``documents`` (None) and ``bos_token``/``eos_token`` when
they are not None (an absent token is undefined, so it renders as "", as in transformers).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slmkit.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool", "developer")

# Verbatim chat_template strings of the models' tokenizer_config.json on the Hugging Face Hub
# (microsoft/Phi-3-mini-*, Phi-3.5-mini, Phi-3-medium-*, Phi-3-vision-128k and Phi-3-small-* instruct).
PHI3_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_MINI_APRIL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
PHI3_MEDIUM_TEMPLATE = PHI3_MINI_APRIL_TEMPLATE.removeprefix("{{ bos_token }}")
PHI35_TEMPLATE = PHI3_MINI_TEMPLATE.replace(
    "{% if message['role'] == 'system' %}", "{% if message['role'] == 'system' and message['content'] %}")
PHI3_VISION_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
PHI3_SMALL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{'<|' + m['role'] + '|>' + '\n' + m['content'] + '<|end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# For models without a template whose family slmkit does not know: BOS (if the tokenizer has one), then
# "role: content\n" per message, then "assistant:" when a reply is wanted. A plain completion-style prompt.
GENERIC_TEMPLATE = (
    "{% if bos_token is defined %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@dataclass
class ImagePart:
    """An image of the conversation: the image_url.url (data: URL, http(s) URL or file path)."""

    url: str
    detail: str | None = None


@dataclass
class Prompt:
    """Rendered template text; images in prompt order (image n is ``<|image_n|>`` in the text)."""

    text: str
    images: list[ImagePart] = field(default_factory=list)


def fallback_template(model_type: str, name_hint: str = "") -> str:
    """The built-in template for a model whose files carry none: the template its family publishes."""
    mt, hint = (model_type or "").lower(), (name_hint or "").lower()
    if mt == "phi3_v":
        return PHI3_VISION_TEMPLATE
    if mt == "phi3small":
        return PHI3_SMALL_TEMPLATE
    if mt == "phimoe" or (mt.startswith("phi") and "3.5" in hint):
        return PHI35_TEMPLATE
    if mt.startswith("phi"):
        return PHI3_MEDIUM_TEMPLATE if "medium" in hint else PHI3_MINI_TEMPLATE
    return GENERIC_TEMPLATE


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def check_text(text: str, param: str) -> str:
    """text, if it can be encoded as UTF-8 (the tokenizer's input); a lone surrogate such as
    "\\ud800", which Python strings (and JSON escapes) allow, cannot."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(f"holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not valid "
                       "Unicode text", param) from None
    return text


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, Mapping):
        raise _bad("each content part must be an object", where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _bad("a text part needs a string 'text'", f"{where}.text")
        check_text(part["text"], f"{where}.text")
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        if not isinstance(url, str) or not url:
            raise _bad("an image_url part needs a non-empty string 'image_url.url'", f"{where}.image_url")
    else:
        raise _bad(f"unknown content part type {kind!r} (expected 'text' or 'image_url')", f"{where}.type")


def normalize_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Validate OpenAI-shaped messages; return shallow dict copies (content kept as given: str, list or None)."""
    if not isinstance(messages, (list, tuple)):
        raise _bad("must be a list of messages", "messages")
    if not messages:
        raise _bad("must contain at least one message", "messages")
    out: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise _bad("each message must be an object", where)
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        content = msg.get("content")
        if content is None:
            if role != "assistant":
                raise _bad(f"a {role} message needs content", f"{where}.content")
        elif isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        elif isinstance(content, str):
            check_text(content, f"{where}.content")
        else:
            raise _bad("must be a string or a list of content parts", f"{where}.content")
        for key, kind in (("name", str), ("tool_call_id", str), ("tool_calls", (list, tuple))):
            if msg.get(key) is not None and not isinstance(msg[key], kind):
                raise _bad(f"has the wrong type {type(msg[key]).__name__}", f"{where}.{key}")
        item = dict(msg)
        if isinstance(content, tuple):
            item["content"] = list(content)
        out.append(item)
    return out


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_prompt(messages: Sequence[Mapping], template: str | None, *, bos_token: str | None = None,
                  eos_token: str | None = None, add_generation_prompt: bool = True, model_type: str = "phi3",
                  name_hint: str = "", image_token_format: str = "<|image_{n}|>\n") -> Prompt:
    """Render messages with template (or fallback_template(model_type, name_hint) when None).

    List contents become one string: text parts in order, each image part replaced by image_token_format with
    ``{n}`` = the 1-based running image number across the conversation. None content renders as "".
    """
    msgs = normalize_messages(messages)
    images: list[ImagePart] = []
    for msg in msgs:
        content = msg.get("content")
        if content is None:
            msg["content"] = ""
        elif isinstance(content, list):
            pieces: list[str] = []
            for part in content:
                if part["type"] == "text":
                    pieces.append(part["text"])
                else:
                    image = part["image_url"]
                    url, detail = (image["url"], image.get("detail")) if isinstance(image, Mapping) else (image, None)
                    images.append(ImagePart(url=url, detail=detail))
                    pieces.append(image_token_format.replace("{n}", str(len(images))))
            msg["content"] = "".join(pieces)
    if template is None:
        template = fallback_template(model_type, name_hint)
    variables: dict[str, Any] = {"messages": msgs, "add_generation_prompt": add_generation_prompt,
                                 "tools": None, "documents": None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        text = _compile(template).render(**variables)
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"the chat template failed: {e}", param="chat_template") from e
    except Exception as e:  # a template is code from the model's files: any error it raises (1/0, a
        # recursive macro) is that template failing on these messages, never a crash of the caller
        raise InvalidRequestError(f"the chat template cannot render these messages ({type(e).__name__}: {e})",
                                  param="chat_template") from e
    return Prompt(text=text, images=images)
