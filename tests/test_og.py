"""slmkit.og: ONNX Runtime GenAI's Python API, its example loops run unchanged on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import slmkit
import slmkit.og as og
from slmkit.errors import ContextLengthError, InvalidRequestError, UnsupportedInputError

PROMPT = "<|user|>\nWhy is the sky blue?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return make_phi3_folder(tmp_path_factory.mktemp("og"), "gqa")


@pytest.fixture(scope="module")
def model(folder):
    return og.Model(str(folder), dtype="float32")


def test_text_loop_as_ort_examples_write_it_equals_llm_generate(model, capsys):
    tokenizer = og.Tokenizer(model)
    tokenizer_stream = tokenizer.create_stream()
    input_tokens = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_tokens) + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(input_tokens)
    while not generator.is_done():
        generator.compute_logits()
        generator.generate_next_token()
        new_token = generator.get_next_tokens()[0]
        print(tokenizer_stream.decode(new_token), end="", flush=True)
    printed = capsys.readouterr().out
    expected = model.llm.generate(PROMPT, max_new_tokens=12, temperature=0)
    sequence = generator.get_sequence(0)
    assert isinstance(input_tokens, np.ndarray) and input_tokens.dtype == np.int32
    assert sequence[: len(input_tokens)].tolist() == input_tokens.tolist()
    assert sequence[len(input_tokens):].tolist() == expected.token_ids
    assert generator.token_count() == len(sequence)
    assert printed == expected.text == tokenizer.decode(sequence[len(input_tokens):])


def test_older_scripts_set_params_input_ids(model):
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.input_ids = tokenizer.encode("The sky")
    params.set_search_options(max_length=len(params.input_ids) + 6)
    generator = og.Generator(model, params)
    while not generator.is_done():
        generator.generate_next_token()
    new = generator.get_sequence(0)[len(params.input_ids):].tolist()
    assert new == model.llm.generate("The sky", max_new_tokens=6, temperature=0).token_ids


def test_text_prompt_through_the_multimodal_processor(model):
    processor = model.create_multimodal_processor()
    inputs = processor(PROMPT)
    assert inputs.input_ids.tolist() == og.Tokenizer(model).encode(PROMPT).tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(inputs.input_ids) + 5)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)  # ORT GenAI >= 0.6 sets the inputs on the generator
    while not generator.is_done():
        generator.generate_next_token()
    new = generator.get_sequence(0)[len(inputs.input_ids):].tolist()
    assert new == model.llm.generate(PROMPT, max_new_tokens=5, temperature=0).token_ids
    assert processor.decode(new) == model.llm.tokenizer.decode(new)
    with pytest.raises(UnsupportedInputError, match="audio"):
        processor(PROMPT, audios=object())
    with pytest.raises(InvalidRequestError, match="og.Images"):
        processor(PROMPT, images=["a.png"])


def test_encode_batch_pads_right_and_equal_rows_decode_together(model):
    tokenizer = og.Tokenizer(model)
    batch = tokenizer.encode_batch(["The sky is", "The sea is blue and"])
    short = tokenizer.encode("The sky is")
    assert batch.shape == (2, len(tokenizer.encode("The sea is blue and")))
    assert batch[0, : len(short)].tolist() == short.tolist()
    assert set(batch[0, len(short):].tolist()) == {tokenizer.pad_token_id}
    assert tokenizer.decode_batch(batch)[1] == tokenizer.decode(tokenizer.encode("The sea is blue and"))
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=2, max_length=batch.shape[1] + 4)
    with pytest.raises(InvalidRequestError, match="padded to different lengths"):
        og.Generator(model, params).append_tokens(batch)
    same = np.stack([short, short])
    generator = og.Generator(model, params)
    generator.append_tokens(same)
    while not generator.is_done():
        generator.generate_next_token()
    assert generator.get_sequence(0).tolist() == generator.get_sequence(1).tolist()


def test_search_options_and_logits(model):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40, temperature=0.7, do_sample=True, top_k=5, random_seed=3,
                              past_present_share_buffer=False)
    got = params.get_search_options()
    assert (got["max_length"], got["top_k"], got["random_seed"], got["do_sample"]) == (40, 5, 3, True)
    ids = og.Tokenizer(model).encode("The sky")
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    logits = generator.get_logits()
    assert logits.shape == (1, model.llm.engine.vocab_size) and logits.dtype == np.float32
    forced = np.full_like(logits, -1e9)
    forced[0, 123] = 0
    generator.set_logits(forced)
    generator.generate_next_token()
    assert generator.get_next_tokens().tolist() == [123]
    generator.rewind_to(len(ids))
    assert generator.token_count() == len(ids)


def test_model_type_device_and_config(folder, model):
    assert model.type == "phi3" and model.device_type == "CPU"
    config = og.Config(str(folder))
    config.clear_providers()
    config.append_provider("cpu")
    config.set_provider_option("cpu", "anything", "1")
    config.overlay(json.dumps({"search": {"max_length": 9}}))
    with pytest.raises(InvalidRequestError, match="'dml' is not available"):
        config.append_provider("dml")
    with pytest.raises(InvalidRequestError, match="not JSON"):
        config.overlay("{")
    from_config = og.Model(config, dtype="float32")
    params = og.GeneratorParams(from_config)
    assert params.get_search_options()["max_length"] == 9
    generator = og.Generator(from_config, params)
    generator.append_tokens([1, 10, 20])
    while not generator.is_done():
        generator.generate_next_token()
    assert generator.token_count() == 9


def test_tokenizer_extras(model):
    tokenizer = og.Tokenizer(model)
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(json.dumps(messages)) == model.llm.render(messages).text
    assert tokenizer.to_token_id("<|end|>") in tokenizer.eos_token_ids.tolist()
    assert tokenizer.bos_token_id == 1 and tokenizer.decode([]) == ""
    with pytest.raises(InvalidRequestError, match="not a token"):
        tokenizer.to_token_id("no-such-token-here")


@pytest.mark.parametrize(("tokens", "match"), [
    ("The sky", "encode text"),
    ([1.5, 2.0], "integer token ids"),
    ([[1, 2], [3]], "same length"),
    ([], "non-empty"),
    ([10**9], "vocabulary"),
])
def test_bad_tokens_are_named_errors(model, tokens, match):
    generator = og.Generator(model, og.GeneratorParams(model))
    with pytest.raises(InvalidRequestError, match=match):
        generator.append_tokens(tokens)


def test_bad_arguments_are_named_errors(model, tmp_path):
    params = og.GeneratorParams(model)
    with pytest.raises(InvalidRequestError, match="unknown search option 'diversity'"):
        params.set_search_options(diversity=1)
    with pytest.raises(InvalidRequestError, match="unknown guidance type"):
        params.set_guidance("xml", "<a/>")
    with pytest.raises(InvalidRequestError, match="og.Model"):
        og.GeneratorParams("model")
    with pytest.raises(InvalidRequestError, match="og.Model and og.GeneratorParams"):
        og.Generator(model, {"max_length": 5})
    with pytest.raises(InvalidRequestError, match="multimodal processor's output"):
        params.set_inputs([1, 2, 3])
    with pytest.raises(InvalidRequestError, match=r"image 0 \(.*missing.png\): no such file"):
        og.Images.open(str(tmp_path / "missing.png"))
    with pytest.raises(InvalidRequestError, match="paths must be strings"):
        og.Images.open(b"\x89PNG")
    with pytest.raises(InvalidRequestError, match="must be bytes"):
        og.Images.open_bytes("a.png")
    params.set_search_options(max_length=4)
    with pytest.raises(ContextLengthError):
        og.Generator(model, params).append_tokens(list(range(1, 9)))
    with pytest.raises(InvalidRequestError, match="model path"):
        og.Model(3)


def test_generating_past_the_end_is_an_error(model):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=4)
    generator = og.Generator(model, params)
    generator.append_tokens([1, 10, 20])
    generator.generate_next_token()
    assert generator.is_done()
    with pytest.raises(InvalidRequestError, match="done"):
        generator.generate_next_token()


def test_model_takes_a_loaded_llm(model):
    again = og.Model(model.llm)
    assert again.llm is model.llm and isinstance(again.llm, slmkit.LLM)


# ------------------------------------------------------------------ images (a tiny phi3_v folder)
@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3v_folder

    return make_phi3v_folder(tmp_path_factory.mktemp("og_v"))


@pytest.fixture(scope="module")
def vision_model(vision_folder):
    return og.Model(str(vision_folder), dtype="float32")


def _image(path, size=(60, 40), color=(10, 200, 30)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return str(path)


def test_readme_snippet_runs_as_is(vision_folder, tmp_path, capsys):
    """The ORT GenAI Phi-3.5-vision loop from README.md, only the path and the image file set."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\nimport slmkit.og as og\n", 1)[1].split("```", 1)[0]
    setup, _, loop = code.lstrip("\n").partition("\n")
    assert setup.startswith("path, image_paths = ")
    scope: dict = {"og": og, "path": str(vision_folder), "image_paths": [_image(tmp_path / "a.png")]}
    exec(loop, scope)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    generator, inputs, model = scope["generator"], scope["inputs"], scope["model"]
    sequence = generator.get_sequence(0)
    n = len(inputs.input_ids)
    assert sequence[:n].tolist() == inputs.input_ids.tolist() and (sequence[:n] == -1).sum() == 757
    assert generator.is_done() and (len(sequence) == 3072 or sequence[-1] in model.llm.engine.eos_token_ids)
    first = model.llm.generate(inputs, max_new_tokens=40, temperature=0).token_ids
    assert sequence[n:n + 40].tolist() == first
    assert printed.startswith(model.llm.tokenizer.decode(first)[:5])


def test_two_images_and_a_repeat_equal_llm_generate(vision_model, tmp_path):
    a = _image(tmp_path / "a.png")
    with open(_image(tmp_path / "b.png", (30, 90), (200, 10, 10)), "rb") as f:
        b = f.read()
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare these, then <|image_1|> again.<|end|>\n<|assistant|>\n"
    processor = vision_model.create_multimodal_processor()
    inputs = processor(prompt, images=og.Images.open_bytes(open(a, "rb").read(), b))
    assert inputs.pixel_values.shape[:2] == (2, 5)
    params = og.GeneratorParams(vision_model)
    params.set_search_options(max_length=len(inputs.input_ids) + 24)
    generator = og.Generator(vision_model, params)
    generator.set_inputs(inputs)
    stream, text = processor.create_stream(), []
    while not generator.is_done():
        generator.generate_next_token()
        text.append(stream.decode(generator.get_next_tokens()[0]))
    expected = vision_model.llm.generate(inputs, max_new_tokens=24, temperature=0)
    sequence = generator.get_sequence(0)
    assert sequence[len(inputs.input_ids):].tolist() == expected.token_ids
    new_text = vision_model.llm.tokenizer.decode(expected.token_ids)
    assert processor.decode(sequence).endswith(new_text) and "Compare these" in processor.decode(sequence)
    assert "".join(text) == new_text or "\ufffd" in new_text  # the stream holds back invalid byte runs
    assert sorted(set(sequence[sequence < 0].tolist())) == [-2, -1]  # the processor's ids, not the engine's
    same = processor(prompt, images=og.Images.open(a, str(tmp_path / "b.png")))
    assert same.input_ids.tolist() == inputs.input_ids.tolist()


def test_image_errors_name_the_problem(vision_model, model, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidRequestError, match="empty.png") as e:
        og.Images.open(_image(tmp_path / "a.png"), str(empty))
    assert e.value.param == "images[1]"
    with pytest.raises(InvalidRequestError, match="images"):
        og.Images.open_bytes(b"not an image")
    images = og.Images.open(_image(tmp_path / "a.png"))
    processor = vision_model.create_multimodal_processor()
    with pytest.raises(InvalidRequestError, match="2") as e:
        processor("<|image_1|> and <|image_2|>", images=images)
    with pytest.raises(UnsupportedInputError, match="text-only|takes no images"):
        model.create_multimodal_processor()("<|image_1|> hi", images=images)
    assert vision_model.type == "phi3v"


def test_guidance_constrains_the_loop(model):
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12)
    params.set_guidance("regex", "[0-9]{3}")
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0)[len(ids):])
    assert len(text) == 3 and text.isdigit()
