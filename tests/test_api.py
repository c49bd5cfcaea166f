"""The Python API end to end on a tiny model: chat, generate, streaming, stop strings, errors."""
from __future__ import annotations

import pytest

import slmkit
from slmkit import InvalidRequestError, UnsupportedInputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return make_phi3_folder(tmp_path_factory.mktemp("api"), "gqa")


@pytest.fixture(scope="module")
def llm(folder):
    return slmkit.load(folder, dtype="float32")


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def test_chat_uses_template_and_counts_usage(llm):
    out = llm.chat(MSGS, max_new_tokens=16, temperature=0, ignore_eos=True)
    prompt_ids = llm.tokenizer.encode(llm.render(MSGS).text, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 16
    assert out.usage.total_tokens == len(prompt_ids) + 16
    assert out.token_ids == llm.generate(prompt_ids, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stream_concatenates_to_full_text(llm):
    chunks = list(llm.chat(MSGS, stream=True, max_new_tokens=20, temperature=0, ignore_eos=True))
    full = llm.chat(MSGS, max_new_tokens=20, temperature=0, ignore_eos=True)
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_cuts_text(llm):
    full = llm.generate("The sky", max_new_tokens=24, temperature=0, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("The sky", max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in llm.generate("The sky", stream=True, max_new_tokens=24, temperature=0,
                                                    ignore_eos=True, stop=stop))
    assert streamed == cut.text


def test_model_stop_tokens_include_end_of_turn(llm):
    tok = llm.tokenizer
    assert tok.token_to_id("<|end|>") in llm.engine.eos_token_ids
    assert tok.token_to_id("<|endoftext|>") in llm.engine.eos_token_ids


def test_image_parts_rejected_by_text_model(llm):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(UnsupportedInputError):
        llm.chat(msgs)


def test_text_parts_accepted(llm):
    msgs = [{"role": "user",
             "content": [{"type": "text", "text": "Why is the sky "}, {"type": "text", "text": "blue?"}]}]
    assert llm.render(msgs).text == llm.render([{"role": "user", "content": "Why is the sky blue?"}]).text


def test_bad_requests(llm):
    with pytest.raises(InvalidRequestError):
        llm.chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        llm.generate("")
    with pytest.raises(InvalidRequestError, match="stop"):
        llm.generate("hi", stop=[3])


def test_logits_shape(llm):
    ids = llm.tokenizer.encode("hello world")
    assert tuple(llm.logits(ids).shape) == (len(ids), llm.engine.vocab_size)


def test_generator_from_llm_streams_text(llm):
    ids = llm.tokenizer.encode("Why is the sky")
    gen = slmkit.Generator(llm, slmkit.GeneratorParams(max_length=len(ids) + 12, temperature=0))
    gen.append_tokens(ids)
    llm.tokenizer.reset_stream()
    pieces = []
    while not gen.is_done():
        gen.generate_next_token()
        pieces.append(llm.tokenizer.stream_decode(gen.get_next_tokens()[0]))
    new = gen.get_sequence(0)[len(ids):]
    text = llm.tokenizer.decode(new)
    # a random model may end on an incomplete byte-fallback character, which stays unprinted
    assert "".join(pieces) == text.rstrip("\ufffd") and "\ufffd" not in "".join(pieces)[-1:]


def test_completion_keeps_the_space_between_prompt_and_reply(llm):
    """A SentencePiece word piece at the start of the reply keeps its leading space."""
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. The dog")
    out = llm.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    whole = llm.tokenizer.decode(ids + out.token_ids)
    if "\ufffd" not in whole:
        assert llm.tokenizer.decode(ids) + out.text == whole
    space = llm.tokenizer.token_to_id("▁the")
    x = llm.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True, stop=None)
    stream = llm.tokenizer.create_stream()
    stream.prime(ids)
    assert stream.decode(space) == " the" and x.finish_reason == "length"


@pytest.mark.parametrize("call, param", [
    (lambda m: m.generate(["a"]), "prompt"),
    (lambda m: m.generate([1.7, 5.2]), "prompt"),
    (lambda m: m.generate([None]), "prompt"),
    (lambda m: m.generate([2**70]), "prompt"),
    (lambda m: m.generate("hi", stop=5), "stop"),
    (lambda m: m.generate("hi", seed=2**70), "seed"),
    (lambda m: m.generate("hi", temperature="hot"), "temperature"),
    (lambda m: m.tokenizer.encode(5), "text"),
    (lambda m: m.tokenizer.decode([-1]), "ids"),
    (lambda m: m.tokenizer.create_stream().decode(1.5), "ids"),
])
def test_bad_input_is_a_typed_error_naming_the_parameter(llm, call, param):
    with pytest.raises(InvalidRequestError) as e:
        call(llm)
    assert e.value.param == param


def test_streaming_validates_at_the_call(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([llm.engine.vocab_size + 5], stream=True)


@pytest.mark.parametrize("kw, param", [({"dtype": "int8"}, "dtype"), ({"device": "nope"}, "device"),
                                       ({"device": "cuda:0"}, "device")])
def test_bad_dtype_or_device(folder, kw, param):
    import torch

    if kw.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidRequestError) as e:
        slmkit.load(folder, **kw)
    assert e.value.param == param


def test_check_images_is_the_one_text_only_refusal(llm):
    from slmkit.api import check_images

    check_images("m", True)
    check_images("m", None)  # not known yet (a model not loaded): not refused here
    with pytest.raises(UnsupportedInputError, match=r"'m' \(phi3\) is text-only") as e:
        check_images("m", False, model_type="phi3")
    assert e.value.param == "messages"
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(UnsupportedInputError, match="text-only") as e:
        llm.render(parts)
    assert e.value.param == "messages"


def test_one_version_string(llm):
    from importlib.metadata import version

    from slmkit.server.app import create_app

    assert slmkit.__version__ == version("slmkit")
    assert create_app({"m": llm}).version == slmkit.__version__
