"""Phi3VProcessor: prompt ids as the reference builds them (§4: text split at <|image_N|>, each chunk
tokenized with its own BOS, tag k -> N_k copies of -k), the tag and count checks, num_crops."""
from __future__ import annotations

import base64
import io
import json
from itertools import groupby

import numpy as np
import pytest
import torch
from PIL import Image

from slmkit.errors import ConfigError, ContextLengthError, ImageError, InvalidRequestError, ModelFileError
from slmkit.text.tokenizer import Tokenizer
from slmkit.vision import MultimodalInputs, Phi3VProcessor, preprocess
from tests.helpers.tiny_tokenizer import build_phi_tokenizer

PROMPT = "<|user|>\n<|image_1|>\nSummarize the deck of slides.<|end|>\n<|assistant|>\n"  # §4's example


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("phi3v-tok")
    build_phi_tokenizer(folder, "phi3-vision")
    return Tokenizer.from_folder(folder)


def slide(width=2048, height=1152, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """[(value, length)] of the runs of negative ids."""
    return [(k, len(list(g))) for k, g in groupby(ids) if k < 0]


def test_the_worked_example_structure(tok):
    assert tok.add_bos and tok.bos_token_id == 1
    out = Phi3VProcessor(tok, num_crops=4)(PROMPT, [slide()])
    assert isinstance(out, MultimodalInputs)
    ids = out.input_ids.tolist()
    before, after = tok.encode("<|user|>\n"), tok.encode("\nSummarize the deck of slides.<|end|>\n<|assistant|>\n")
    assert before[0] == 1 and after[0] == 1  # BOS on every chunk, the one after the image too
    assert ids == before + [-1] * 757 + after
    assert len(ids) == len(before) + 757 + len(after)
    assert out.input_ids.dtype == torch.long and out.input_ids.dim() == 1
    assert out.pixel_values.shape == (1, 5, 3, 336, 336) and out.pixel_values.dtype == torch.float32
    assert out.image_sizes.tolist() == [[672, 672]] and out.image_sizes.dtype == torch.long
    assert out.num_image_tokens == [757] and out.num_crops == 4
    assert out.attention_mask.all() and out.attention_mask.shape == out.input_ids.shape
    assert torch.equal(out.pixel_values, preprocess([slide()], 4)[0])


def test_several_images_and_the_same_image_twice(tok):
    a, b = slide(2048, 1152), slide(300, 900, seed=1)
    prompt = "<|image_1|>first<|image_2|> then <|image_1|> again"
    out = Phi3VProcessor(tok)(prompt, [a, b], num_crops=16)
    na, nb = out.num_image_tokens
    assert (na, nb) == tuple(preprocess([a, b], 16)[2]) and na != nb
    ids = out.input_ids.tolist()
    assert runs(ids) == [(-1, na), (-2, nb), (-1, na)]
    want = tok.encode("") + [-1] * na + tok.encode("first") + [-2] * nb + tok.encode(" then ") + [-1] * na \
        + tok.encode(" again")
    assert ids == want
    assert ids.count(1) == 4  # a BOS per chunk, the empty first chunk included
    assert out.pixel_values.shape == (2, 17, 3, 336, 336) and out.num_crops == 16
    # tags may come in any order, as long as they are 1..n
    swapped = Phi3VProcessor(tok)("<|image_2|>x<|image_1|>", [a, b])
    assert runs(swapped.input_ids.tolist()) == [(-2, swapped.num_image_tokens[1]), (-1, swapped.num_image_tokens[0])]


def test_text_only_prompts(tok):
    proc = Phi3VProcessor(tok)
    for images in (None, []):
        out = proc("<|user|>\nhello<|end|>\n", images)
        assert out.input_ids.tolist() == tok.encode("<|user|>\nhello<|end|>\n")
        assert out.pixel_values is None and out.image_sizes is None and out.num_image_tokens == []
        assert out.num_crops is None
    assert proc("", None).input_ids.tolist() == [1]
    assert proc("<|image|> and <|image_x|> are text", None).input_ids.tolist() == \
        tok.encode("<|image|> and <|image_x|> are text")


def test_every_image_source_gives_the_same_inputs(tok, tmp_path):
    img = slide(500, 300)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path = tmp_path / "s.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    proc = Phi3VProcessor(tok)
    want = proc("<|image_1|>", [img])
    for src in (str(path), path, buf.getvalue(), url, [url]):
        got = proc("<|image_1|>", src)
        assert torch.equal(got.pixel_values, want.pixel_values) and torch.equal(got.input_ids, want.input_ids)


@pytest.mark.parametrize("prompt,n_images,counts", [
    ("<|image_1|><|image_2|>", 1, ("2", "1")),
    ("<|image_1|>", 2, ("1", "2")),
    ("no tags here", 1, ("0", "1")),
    ("<|image_1|> <|image_1|>", 2, ("1", "2")),
    ("<|image_1|>", 0, ("1", "0")),
])
def test_count_mismatch_names_both_counts(tok, prompt, n_images, counts):
    with pytest.raises(InvalidRequestError) as e:
        Phi3VProcessor(tok)(prompt, [slide(20, 20)] * n_images if n_images else None)
    assert e.value.param == "images"
    msg = str(e.value)
    assert f"{counts[0]} image tags" in msg and f"{counts[1]} images" in msg, msg


@pytest.mark.parametrize("prompt,numbers", [
    ("<|image_2|>", "2"),
    ("<|image_0|>", "0"),
    ("<|image_1|><|image_3|>", "1, 3"),
    ("<|image_2|><|image_3|>", "2, 3"),
])
def test_bad_tag_numbers(tok, prompt, numbers):
    n = prompt.count("<|image")
    with pytest.raises(InvalidRequestError) as e:
        Phi3VProcessor(tok)(prompt, [slide(20, 20)] * n)
    assert e.value.param == "prompt"
    assert f"numbered {numbers} " in str(e.value) and "<|image_1|>" in str(e.value)


def test_a_bad_image_is_named(tok):
    with pytest.raises(ImageError) as e:
        Phi3VProcessor(tok)("<|image_1|><|image_2|>", [slide(20, 20), b"\x89PNG broken"])
    assert e.value.param == "images[1]"


def test_bad_arguments(tok):
    proc = Phi3VProcessor(tok)
    with pytest.raises(InvalidRequestError) as e:
        proc(["not", "a", "string"])
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        proc("<|image_1|>", iter([slide(20, 20)]))
    assert e.value.param == "images"
    for bad in (0, 65, True, 2.0, "4"):
        with pytest.raises(InvalidRequestError) as e:
            proc("<|image_1|>", [slide(20, 20)], num_crops=bad)
        assert e.value.param == "num_crops"
        with pytest.raises(InvalidRequestError):
            Phi3VProcessor(tok, num_crops=bad)


def test_num_crops_default_and_override(tok):
    img = slide(1344, 1344)
    proc = Phi3VProcessor(tok, num_crops=16)
    assert proc("<|image_1|>", [img]).pixel_values.shape[1] == 17
    small = proc("<|image_1|>", [img], num_crops=1)
    assert small.pixel_values.shape[1] == 2 and small.num_image_tokens == [313] and small.num_crops == 1
    assert Phi3VProcessor(tok).num_crops == 4


def test_from_folder_reads_num_crops(tok, tmp_path):
    assert Phi3VProcessor.from_folder(tmp_path, tok).num_crops == 4  # no preprocessor_config.json
    cfg = tmp_path / "preprocessor_config.json"
    cfg.write_text(json.dumps({"image_processor_type": "Phi3VImageProcessor", "num_crops": 16}))
    assert Phi3VProcessor.from_folder(tmp_path, tok).num_crops == 16
    cfg.write_text(json.dumps({"image_processor_type": "Phi3VImageProcessor"}))
    assert Phi3VProcessor.from_folder(tmp_path, tok).num_crops == 4
    for bad in (0, 100, "16", True, None):
        cfg.write_text(json.dumps({"num_crops": bad}))
        with pytest.raises(ConfigError) as e:
            Phi3VProcessor.from_folder(tmp_path, tok)
        assert e.value.field == "num_crops" and e.value.path == str(cfg)
    for text in ("[16]", "{not json"):
        cfg.write_text(text)
        with pytest.raises(ModelFileError) as e2:
            Phi3VProcessor.from_folder(tmp_path, tok)
        assert e2.value.path == str(cfg)


def test_from_folder_reads_the_context_length(tok, tmp_path):
    assert Phi3VProcessor.from_folder(tmp_path, tok).max_length == 131072
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3_v", "max_position_embeddings": 4096}))
    assert Phi3VProcessor.from_folder(tmp_path, tok).max_length == 4096
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": -1}))
    with pytest.raises(ConfigError) as e:
        Phi3VProcessor.from_folder(tmp_path, tok)
    assert e.value.field == "max_position_embeddings"


def test_prompts_over_the_context_stop_before_the_next_image(tok):
    img = slide(20, 20)  # 313 tokens at num_crops 1
    proc = Phi3VProcessor(tok, num_crops=1, max_length=700)
    assert len(proc("<|image_1|><|image_2|>", [img, img]).input_ids) == 2 * 313 + 3  # and a BOS per chunk (3)
    with pytest.raises(ContextLengthError) as e:
        proc("<|image_1|>" * 3, [img])
    assert e.value.length == 3 * 313 + 4 and e.value.limit == 700
    with pytest.raises(ContextLengthError) as e:  # the broken third image is never loaded
        proc("<|image_1|><|image_2|><|image_2|><|image_3|>", [img, img, b"not an image"])
    assert e.value.limit == 700 and e.value.length >= 700 and "at least" in str(e.value)


def test_tag_numbers_with_thousands_of_digits(tok):
    with pytest.raises(InvalidRequestError) as e:
        Phi3VProcessor(tok)("<|image_" + "9" * 5000 + "|>", [slide(20, 20)])
    assert e.value.param == "prompt" and "5000 digits" in str(e.value)
