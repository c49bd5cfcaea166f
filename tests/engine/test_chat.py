"""render_prompt vs transformers apply_chat_template, message validation, images, fallback templates."""
from __future__ import annotations

import warnings

import pytest

from slmkit.errors import InvalidRequestError
from slmkit.text import chat
from slmkit.text.chat import ImagePart, Prompt, fallback_template, normalize_messages, render_prompt
from slmkit.text.tokenizer import Tokenizer
from tests.helpers.tiny_tokenizer import TEMPLATES, VARIANTS, build_phi_tokenizer, write_model_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SYSTEM = {"role": "system", "content": "System message"}
USER = {"role": "user", "content": "Hello, can you call some tools for me?"}
ASSISTANT = {"role": "assistant", "content": "Sure, I can calculate the sum for you!"}
CONVERSATIONS = {
    "single": [USER],
    "system": [SYSTEM, USER],
    "multi": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "Schöne Grüße 🦀, 你好!"}],
    "empty-system": [{"role": "system", "content": ""}, USER],
    "ends-with-assistant": [USER, ASSISTANT],
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{(variant, kind): (Tokenizer, transformers tokenizer)}; kind "model" has config.json, "tok" does not."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for variant in VARIANTS:
        for kind in ("tok", "model"):
            d = root / f"{variant}-{kind}"
            build_phi_tokenizer(d, variant)
            if kind == "model":
                write_model_config(d, variant)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[variant, kind] = (Tokenizer.from_folder(d), transformers.AutoTokenizer.from_pretrained(str(d)))
    return out


def _render(tok: Tokenizer, messages, **kw) -> Prompt:
    return render_prompt(messages, tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token, **kw)


def _hf_ids(hf, messages, add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("kind", ["tok", "model"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_render_and_ids_match_transformers(pairs, variant, kind):
    tok, hf = pairs[variant, kind]
    for name, messages in CONVERSATIONS.items():
        for gen in (True, False):
            text = _render(tok, messages, add_generation_prompt=gen).text
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen), name
            assert tok.encode(text, add_special_tokens=False) == _hf_ids(hf, messages, gen), name


def test_list_of_text_parts_is_joined(pairs):
    tok, hf = pairs["phi3-mini-june", "model"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]
    text = _render(tok, parts).text
    assert text == hf.apply_chat_template([{"role": "user", "content": "Hello, world"}], tokenize=False,
                                          add_generation_prompt=True)
    assert text == "<|user|>\nHello, world<|end|>\n<|assistant|>\n"


def test_phi35_skips_empty_system_and_june_keeps_it(pairs):
    msgs = CONVERSATIONS["empty-system"]
    assert not _render(pairs["phi3.5-mini", "model"][0], msgs).text.startswith("<|system|>")
    assert _render(pairs["phi3-mini-june", "model"][0], msgs).text.startswith("<|system|>\n<|end|>")


def test_rstrip_removes_newlines_after_tags_june_not_april(pairs):
    """The Hub's tokenizer_config.json flags: June/medium/3.5 (rstrip on the tags) have no newline ids in the
    templated chat; April/vision keep "▁"+"\\n" after the tags, and "System" right after a tag gets the "▁" prefix
    (2184 "▁System" in the real vocab)."""
    msgs = CONVERSATIONS["multi"][:3]
    for variant in ("phi3-mini-june", "phi3-medium", "phi3.5-mini", "phi3-mini-april", "phi3-vision"):
        tok, _ = pairs[variant, "model"]
        ids = tok.encode(_render(tok, msgs).text, add_special_tokens=False)
        nl, space = tok.token_to_id("<0x0A>"), tok.token_to_id("▁")
        tags = {tok.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")}
        after_tags = [ids[i + 1] for i, t in enumerate(ids[:-1]) if t in tags]
        if variant in ("phi3-mini-june", "phi3-medium", "phi3.5-mini"):
            assert nl not in ids, variant
            assert all(tok.id_to_token(t).startswith("▁") or t in tags for t in after_tags), variant
        else:
            assert ids.count(nl) >= 3, variant
            user = tok.token_to_id("<|user|>")
            assert ids[ids.index(user) + 1: ids.index(user) + 3] == [space, nl], variant
    june, _ = pairs["phi3-mini-june", "model"]
    ids = june.encode(_render(june, msgs).text, add_special_tokens=False)
    assert june.id_to_token(ids[1]).startswith("▁") and ids[0] == june.token_to_id("<|system|>")
    assert ids[-1] == june.token_to_id("<|assistant|>")


def test_images_become_numbered_placeholders():
    msgs = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And these? "},
                                     {"type": "image_url", "image_url": "http://x/b.png"},
                                     {"type": "image_url", "image_url": {"url": "/tmp/c.jpg", "detail": "low"}}]},
    ]
    p = render_prompt(msgs, None, model_type="phi3_v")
    assert p.text == ("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
                      "<|user|>\nAnd these? <|image_2|>\n<|image_3|>\n<|end|>\n<|assistant|>\n")
    assert [i.url for i in p.images] == ["data:image/png;base64,AAA", "http://x/b.png", "/tmp/c.jpg"]
    assert p.images[2] == ImagePart(url="/tmp/c.jpg", detail="low")
    custom = render_prompt(msgs[:1], "{{ messages[0]['content'] }}", image_token_format="[img{n}]")
    assert custom.text == "[img1]What is this?" and len(custom.images) == 1
    assert render_prompt([{"role": "user", "content": "hi"}], None).images == []


BAD = [
    ("not a list", "messages"),
    ({"role": "user", "content": "x"}, "messages"),
    ([], "messages"),
    (["hi"], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], "messages[1].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": ["text"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     "messages[0].content[1].image_url"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": "x", "name": 7}], "messages[0].name"),
    ([{"role": "assistant", "content": None, "tool_calls": "x"}], "messages[0].tool_calls"),
]


@pytest.mark.parametrize(("messages", "param"), BAD)
def test_invalid_messages(messages, param):
    with pytest.raises(InvalidRequestError) as e:
        normalize_messages(messages)
    assert e.value.param == param
    with pytest.raises(InvalidRequestError):
        render_prompt(messages, None)


def test_normalize_keeps_content_and_copies():
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]
    msgs = [{"role": "developer", "content": "d"}, {"role": "user", "content": parts, "name": "bob"},
            {"role": "assistant", "content": None, "tool_calls": []}, {"role": "tool", "content": "r",
                                                                          "tool_call_id": "c1"}]
    out = normalize_messages(msgs)
    assert out == msgs and out[1]["content"] is parts and out[0] is not msgs[0]
    assert render_prompt(msgs[2:3], "[{{ messages[0]['content'] }}]").text == "[]"  # None renders as ""


def test_fallback_template_selection():
    assert fallback_template("phi3_v") == chat.PHI3_VISION_TEMPLATE == TEMPLATES["phi3-vision"]
    assert fallback_template("phi3", "microsoft/Phi-3.5-mini-instruct") == chat.PHI35_TEMPLATE
    assert chat.PHI35_TEMPLATE == TEMPLATES["phi3.5-mini"]
    assert fallback_template("phimoe") == chat.PHI35_TEMPLATE
    assert fallback_template("phi3", "Phi-3-medium-4k-instruct") == chat.PHI3_MEDIUM_TEMPLATE
    assert chat.PHI3_MEDIUM_TEMPLATE == TEMPLATES["phi3-medium"]
    assert fallback_template("phi3") == chat.PHI3_MINI_TEMPLATE == TEMPLATES["phi3-mini-june"]
    assert chat.PHI3_MINI_APRIL_TEMPLATE == TEMPLATES["phi3-mini-april"]
    assert fallback_template("phi3small") == chat.PHI3_SMALL_TEMPLATE
    assert fallback_template("gemma3") == fallback_template("llama", "x") == chat.GENERIC_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(msgs, None, model_type="gemma3", bos_token="<bos>").text == \
        "<bos>system: Be brief.\nuser: Hi\nassistant:"
    assert render_prompt(msgs, None, model_type="gemma3", add_generation_prompt=False).text == \
        "system: Be brief.\nuser: Hi\n"
    assert render_prompt(msgs, None).text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_absent_special_tokens_render_empty_not_none():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_prompt(msgs, chat.PHI3_MINI_APRIL_TEMPLATE).text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert render_prompt(msgs, chat.PHI3_MINI_APRIL_TEMPLATE, bos_token="<s>").text.startswith("<s><|user|>")
    assert render_prompt(msgs, None, eos_token="<|endoftext|>", add_generation_prompt=False).text.endswith(
        "<|end|>\n<|endoftext|>")


def test_template_errors_are_invalid_request():
    msgs = [{"role": "user", "content": "Hi"}]
    for template in ("{{ raise_exception('Roles must alternate') }}", "{% for %}", "{{ messages[0].content + 1 }}",
                     "{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}"):  # the last two: the sandbox
        with pytest.raises(InvalidRequestError) as e:
            render_prompt(msgs, template)
        assert e.value.param == "chat_template"
    with pytest.raises(InvalidRequestError, match="Roles must alternate"):
        render_prompt(msgs, "{{ raise_exception('Roles must alternate') }}")


def test_transformers_template_helpers():
    msgs = [{"role": "user", "content": "Grüße <b>"}]
    template = ("{% for m in messages %}{{ m | tojson }}{% break %}{% endfor %}"
                "{% generation %}|{{ strftime_now('%Y') | length }}{% endgeneration %}")
    assert render_prompt(msgs, template).text == '{"role": "user", "content": "Grüße <b>"}|4'
    assert render_prompt(msgs, "  {% if true %}\n  x\n  {% endif %}\n").text == "  x\n"  # trim/lstrip_blocks
