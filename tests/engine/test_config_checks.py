"""Config values are checked at load, before anything is built from them: every count and size
against the tensors present, every field's type and range, generation_config.json and the chat
template. A hostile or broken folder or GGUF file fails at once with a typed error naming the
field, never an untyped exception, minutes of work or gigabytes of memory first."""
from __future__ import annotations

import json
import shutil
import struct
import tracemalloc

import pytest

import slmkit
from slmkit.errors import ConfigError, InvalidRequestError, ModelFileError
from slmkit.text.chat import render_prompt
from tests.helpers.gguf_files import copy_file, gguf_layout, patch_bytes, patch_u32
from tests.helpers.gguf_models import hf_to_gguf
from tests.helpers.tiny_models import make_gemma3_folder


@pytest.fixture
def phi(phi3_folders, tmp_path):
    return shutil.copytree(phi3_folders("gqa"), tmp_path / "phi")


@pytest.fixture(scope="module")
def gemma_src(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("gemma"))


@pytest.fixture
def gemma(gemma_src, tmp_path):
    return shutil.copytree(gemma_src, tmp_path / "gemma")


@pytest.fixture(scope="module")
def gemma_gguf(gemma_src, tmp_path_factory):
    return hf_to_gguf(gemma_src, tmp_path_factory.mktemp("gguf") / "gemma.gguf", "F32")


def edit(folder, name="config.json", **changes):
    path = folder / name
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:  # "rope_parameters.rope_theta"
            outer, inner = key.split(".", 1)
            cfg[outer][inner] = value
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def load_error(path, kind=ConfigError, *, max_python_mb=None):
    """The error loading path raises; with max_python_mb, also that Python allocated at most that
    much on the way (tracemalloc: the objects a huge count would build before failing)."""
    tracemalloc.start()
    try:
        with pytest.raises(kind) as e:
            slmkit.load(path, dtype="float32")
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    if max_python_mb is not None:
        assert peak < max_python_mb, f"{peak:.0f} MB allocated before the error"
    return e.value


# ----------------------------------------------------------------- counts and sizes vs the weights
def test_layer_count_is_checked_against_the_weights(phi):
    edit(phi, num_hidden_layers=100_000)  # used to build 10^5 layers (minutes, GBs) before failing
    e = load_error(phi, max_python_mb=100)
    assert e.field == "num_hidden_layers" and "100000" in str(e) and "layers 0..2" in str(e)


@pytest.mark.parametrize("field", ["head_dim", "hidden_size", "intermediate_size", "vocab_size",
                                   "num_attention_heads"])
def test_sizes_beyond_every_weight_fail_before_anything_is_built(gemma, field):
    edit(gemma, **{field: 2**31})  # head_dim 2**31 allocated an 8 GiB RoPE table before any check
    e = load_error(gemma)
    assert e.field == field and str(2**31) in str(e) and e.path.endswith("config.json")


@pytest.mark.parametrize("key,value", [("gemma3.block_count", 10**8), ("gemma3.attention.key_length", 2**31),
                                       ("gemma3.embedding_length", 2**31), ("gemma3.feed_forward_length", 2**31)])
def test_gguf_counts_are_checked_against_the_tensor_infos(gemma_gguf, tmp_path, key, value):
    path = copy_file(gemma_gguf, tmp_path / "bad.gguf")
    patch_u32(path, gguf_layout(path).kv[key].value, value)  # block_count 10**8 built a 10**8 set (9 GB)
    e = load_error(path, max_python_mb=100)
    assert e.field == key and str(value) in str(e)


def test_gguf_nonfinite_float_metadata(gemma_gguf, tmp_path):
    path = copy_file(gemma_gguf, tmp_path / "inf.gguf")
    patch_bytes(path, gguf_layout(path).kv["gemma3.rope.freq_base"].value, struct.pack("<f", float("inf")))
    assert load_error(path).field == "gemma3.rope.freq_base"


# ------------------------------------------------------------------------ JSON and field types
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' + "9" * 5000 + "}"],
                         ids=["deep", "huge-int"])
def test_unparseable_json_names_the_file(phi, name, text):
    (phi / name).write_text(text)  # RecursionError / ValueError escaped read_json
    e = load_error(phi, ModelFileError)
    assert e.path.endswith(name) and "JSON" in str(e)


@pytest.mark.parametrize("name,key", [("tokenizer_config.json", "eos_token"), ("config.json", "model_type"),
                                      ("tokenizer_config.json", "chat_template")])
def test_lone_surrogate_in_json_names_the_file(phi, name, key):
    edit(phi, name, **{key: "\ud800"})  # JSON allows the escape; encoding it raised UnicodeEncodeError
    e = load_error(phi, ModelFileError)
    assert e.path.endswith(name) and "surrogate" in str(e)


def test_surrogate_pairs_are_text(phi):
    edit(phi, "tokenizer_config.json", chat_template="🦀{{ messages[0]['content'] }}")  # written as a pair
    assert "\\ud83e\\udd80" in (phi / "tokenizer_config.json").read_text()
    assert slmkit.load(phi).render([{"role": "user", "content": "hi"}]).text == "🦀hi"


@pytest.mark.parametrize("where", ["top", "rope_parameters"])
def test_partial_rotary_factor_null(phi, where):
    if where == "top":
        cfg = json.loads((phi / "config.json").read_text())
        del cfg["rope_parameters"]
        (phi / "config.json").write_text(json.dumps(dict(cfg, partial_rotary_factor=None)))
    else:
        edit(phi, **{"rope_parameters.partial_rotary_factor": None})  # TypeError: '<' on None
    assert load_error(phi).field == "partial_rotary_factor"


@pytest.mark.parametrize("value", [10**400, float("inf"), float("nan")], ids=["huge-int", "inf", "nan"])
def test_rope_theta_must_be_finite_and_positive(phi, value):
    edit(phi, **{"rope_parameters.rope_theta": value})  # 10**400: OverflowError converting to float
    assert load_error(phi).field == "rope_theta"


def test_longrope_factor_entries_are_checked(phi):
    n = 8  # rotary_dim / 2 for head_dim 16
    edit(phi, rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * n,
                               "long_factor": [10**400] * n}, original_max_position_embeddings=32)
    assert load_error(phi).field.startswith("rope_scaling.long_factor")


def test_layer_types_not_a_list(gemma):
    edit(gemma, layer_types=2)  # TypeError: object of type 'int' has no len()
    assert load_error(gemma).field == "layer_types"


# --------------------------------------------------------------------- generation_config.json
@pytest.mark.parametrize("changes,field", [
    ({"do_sample": True, "temperature": "hot"}, "temperature"), ({"top_p": 2}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"do_sample": "yes"}, "do_sample"), ({"eos_token_id": "x"}, "eos_token_id"), ({"top_p": 10**60}, "top_p")])
def test_bad_generation_config_fails_at_load(phi, changes, field):
    edit(phi, "generation_config.json", **changes)  # loaded, then broke every generate
    e = load_error(phi)
    assert e.field == field and e.path.endswith("generation_config.json")


def test_generation_config_nulls_are_absent(phi):
    edit(phi, "generation_config.json", do_sample=True, temperature=None, top_p=None, top_k=None)
    llm = slmkit.load(phi, dtype="float32")  # float(None) raised TypeError in every generate
    assert len(llm.generate("Hello", max_new_tokens=3, seed=1, ignore_eos=True).token_ids) == 3


# ------------------------------------------------------------------------------- chat template
BROKEN_TEMPLATE = "{{ messages[0]['content'] }}{{ 1 / 0 }}"


def test_broken_chat_template_fails_the_load(phi):
    edit(phi, "tokenizer_config.json", chat_template=BROKEN_TEMPLATE)
    e = load_error(phi)
    assert e.field == "chat_template" and "ZeroDivisionError" in str(e)


def test_broken_gguf_chat_template_fails_the_load(phi, tmp_path):
    edit(phi, "tokenizer_config.json", chat_template=BROKEN_TEMPLATE)
    e = load_error(hf_to_gguf(phi, tmp_path / "t.gguf"))
    assert e.field == "tokenizer.chat_template" and "ZeroDivisionError" in str(e)


def test_template_error_at_request_time_is_typed():
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if messages | length > 1 %}{{ 1 // 0 }}{% endif %}")
    assert render_prompt([{"role": "user", "content": "hi"}], template).text == "hi"  # loads fine
    with pytest.raises(InvalidRequestError) as e:
        render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], template)
    assert e.value.param == "chat_template" and "ZeroDivisionError" in str(e.value)
