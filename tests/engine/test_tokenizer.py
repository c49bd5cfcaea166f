"""Tokenizer vs transformers.AutoTokenizer on tiny real Phi-3-style tokenizers (every variant, two folder kinds).

Folder kinds: "tok" holds only tokenizer files, so transformers 5 builds its LlamaTokenizer pipeline (Metaspace,
prepend_scheme "first"); "model" adds config.json with model_type phi3/phi3_v, so transformers uses tokenizer.json as
shipped (what real Phi model folders get). Tokenizer.from_folder must agree with transformers in both.
"""
from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from pathlib import Path

import pytest

from slmkit.errors import ConfigError, ModelFileError
from slmkit.text.tokenizer import Tokenizer
from tests.helpers.tiny_tokenizer import VARIANTS, build_phi_tokenizer, phi_special_ids, write_model_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Schöne Grüße aus München! Die Straße ist nass.",
    "你好，世界。東京は日本の首都です。",  # partly outside the tiny vocab: byte fallback
    "I love pizza 🍕 and crabs 🦀🦀 😀!",
    "<|user|>\nHello<|end|>\n<|assistant|>\nSure",
    "<|system|>\nSystem message<|end|>\n<|user|>\n Hi there <|end|>",
    "a</s> b <s>c",
    "  two leading spaces,  two inner",
    " one leading space",
    "\nline\n\nbreaks\n",
    "",
]
KINDS = ("tok", "model")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for variant in VARIANTS:
        for kind in KINDS:
            d = root / f"{variant}-{kind}"
            build_phi_tokenizer(d, variant)
            if kind == "model":
                write_model_config(d, variant)
            out[variant, kind] = d
    return out


def _hf(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def pairs(folders):
    return {key: (Tokenizer.from_folder(d), _hf(d)) for key, d in folders.items()}


def test_builder_layout_is_llama_like_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    build_phi_tokenizer(tmp_path / "a", "phi3-vision")
    assert time.perf_counter() - t0 < 2.0
    build_phi_tokenizer(tmp_path / "b", "phi3-vision")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    data = json.loads((tmp_path / "a" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    assert data["model"]["byte_fallback"] and data["model"]["fuse_unk"] and data["model"]["unk_token"] == "<unk>"
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<0x00>"], vocab["<0xFF>"]) == (0, 1, 2, 3, 258)
    ids = phi_special_ids(tmp_path / "a")
    base = ids["<|endoftext|>"]
    assert base == len(vocab) == 512
    order = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    assert [ids[t] - base for t in order] == list(range(11))
    assert ids["<|image|>"] == base + 44 and ids["<|placeholder39|>"] == base + 43


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_matches_transformers(pairs, variant, kind):
    ours, hf = pairs[variant, kind]
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_and_vocab_match_transformers(pairs, variant, kind):
    ours, hf = pairs[variant, kind]
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_id) == (
        hf.bos_token, hf.eos_token, hf.bos_token_id, hf.eos_token_id)
    assert ours.special_ids == {i for i, t in hf.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
    rnd = random.Random(0)
    seqs = [hf(t)["input_ids"] for t in TEXTS]
    seqs += [[rnd.randrange(ours.vocab_size) for _ in range(12)] for _ in range(30)]
    for ids in seqs:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode([ours.vocab_size + 5]) == ""  # padded embedding rows decode to nothing
    assert ours.id_to_token(ours.token_to_id("<|end|>")) == "<|end|>" and ours.token_to_id("<nope>") is None


def test_bos_flags_per_variant(pairs):
    for (variant, _kind), (ours, _hf_tok) in pairs.items():
        assert ours.add_bos == (variant in ("phi3-mini-april", "phi3-vision")), variant
        assert not ours.add_eos and ours.bos_token_id == 1
        assert (ours.encode("Hi")[0] == 1) == ours.add_bos


def test_config_rstrip_overrides_tokenizer_json(pairs):
    """tokenizer.json says rstrip false on the tags; tokenizer_config.json's flags win (June: the "\\n" is eaten)."""
    for kind in KINDS:
        june, _ = pairs["phi3-mini-june", kind]
        april, _ = pairs["phi3-mini-april", kind]
        nl = june.token_to_id("<0x0A>")
        assert nl not in june.encode("<|user|>\nHi<|end|>\n<|assistant|>\n")
        assert april.encode("<|user|>\nHi<|end|>\n<|assistant|>\n").count(nl) == 3


def test_pipeline_choice_follows_transformers(pairs, folders):
    """Model folders (config.json model_type phi3): "▁" after tags and before leading spaces, as in tokenizer.json;
    tokenizer-only folders: transformers' LlamaTokenizer Metaspace("first") pipeline, and pipeline="file" opts out."""
    text = "<|system|>\nSystem"
    model, _ = pairs["phi3-mini-june", "model"]
    tok, _ = pairs["phi3-mini-june", "tok"]
    assert model.id_to_token(model.encode(text)[1]).startswith("▁")
    assert not tok.id_to_token(tok.encode(text)[1]).startswith("▁")
    as_shipped = Tokenizer.from_folder(folders["phi3-mini-june", "tok"], pipeline="file")
    assert as_shipped.encode(text) == model.encode(text)
    assert as_shipped.encode("  x") != tok.encode("  x")


def test_add_bos_inferred_from_post_processor_when_config_key_absent(folders, tmp_path):
    for variant, expect in (("phi3-mini-april", True), ("phi3-mini-june", False)):
        d = tmp_path / variant
        shutil.copytree(folders[variant, "model"], d)
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        del cfg["add_bos_token"], cfg["add_eos_token"]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        ours = Tokenizer.from_folder(d)
        assert ours.add_bos is expect and ours.add_eos is False
        assert ours.encode("Hello") == _hf(d)("Hello")["input_ids"]


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    stream = tok.create_stream(skip_special_tokens=skip)
    return [stream.decode(i) for i in ids] + [stream.flush()]


STREAM_TEXTS = ["你好，世界。東京は日本の首都です 🍕🦀😀 ok 🦀", "   Hello  world ", " x", "\n\nA\nB"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("variant", ["phi3-mini-june", "phi3-vision"])
def test_stream_decode_concatenates_to_decode(pairs, variant, text):
    tok, _ = pairs[variant, "model"]
    ids = tok.encode(f"<|user|>\n{text}<|end|>\n{text}")
    if "🦀" in text:
        assert tok.byte_piece_ids & set(ids), "the test text must hit byte fallback"
    for skip in (True, False):
        chunks = _stream(tok, ids, skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)
        if ids[-1] not in tok.byte_piece_ids:
            assert chunks[-1] == ""  # nothing is held back until flush


def test_stream_holds_byte_runs_and_default_stream(pairs):
    tok, _ = pairs["phi3-mini-june", "model"]
    crab = [tok.token_to_id(f"<0x{b:02X}>") for b in "🦀".encode()]
    assert [tok.stream_decode(i) for i in crab[:3]] == ["", "", ""]
    tok.reset_stream()  # drops the partial character
    # a complete character comes out at once: a loop that never flushes still prints a final emoji
    assert [tok.stream_decode(i) for i in crab] == ["", "", "", "🦀"]
    assert tok.stream_decode(tok.token_to_id("<|end|>")) == ""
    ok = tok.encode("ok", add_special_tokens=False)
    # "▁ok" is " ok" mid-text (the leading space is stripped only at the start)
    assert "".join(tok.stream_decode(i) for i in ok) == " ok"
    assert "🦀 ok" == tok.decode(crab + ok)
    tok.reset_stream()
    stream = tok.create_stream()
    assert [stream.decode(i) for i in crab[:2]] == ["", ""]
    assert stream.flush() == tok.decode(crab[:2]) == "\ufffd\ufffd"


def test_stream_random_ids_property(pairs):
    """Random pieces, special tokens and byte-fallback characters: with whole characters,
    chunks + flush == decode(ids) and no chunk holds U+FFFD; cut or random byte runs (invalid UTF-8)
    never raise and match decode(ids) wherever decode itself is valid text."""
    tok, _ = pairs["phi3-vision", "tok"]
    pieces = [i for i in range(tok.vocab_size) if i not in tok.byte_piece_ids]
    rnd = random.Random(1)
    for _ in range(150):
        ids: list[int] = []
        for _ in range(rnd.randint(1, 10)):
            if rnd.random() < 0.3:
                ids += [tok.token_to_id(f"<0x{b:02X}>") for b in rnd.choice("é\n€你🦀😀 ").encode()]
            else:
                ids.append(rnd.choice(pieces))
        cut = rnd.choice([0, 0, 1, 2])
        ids = ids[: len(ids) - cut] or ids
        for skip in (True, False):
            chunks = _stream(tok, ids, skip)
            if not cut:
                assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), ids
                assert not any("\ufffd" in c for c in chunks), ids
    for _ in range(100):  # fully random ids: invalid byte runs anywhere
        ids = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randint(1, 14))]
        for skip in (True, False):
            text = tok.decode(ids, skip_special_tokens=skip)
            chunks = _stream(tok, ids, skip)
            if "\ufffd" not in text:
                assert "".join(chunks) == text, ids


def test_stream_invalid_bytes_are_emitted_once_final(pairs):
    tok, _ = pairs["phi3-mini-june", "model"]
    bad = [tok.token_to_id("<0xE4>"), tok.token_to_id("<0x41>")]  # a lead byte, then "A": not UTF-8
    stream = tok.create_stream()
    assert [stream.decode(i) for i in bad] == ["", ""]
    assert stream.decode(tok.token_to_id("<|end|>")) == ""  # skipped special: the run is not over yet
    world = tok.encode("world", add_special_tokens=False)  # "▁world": a plain piece after the run
    out = [stream.decode(i) for i in world]
    assert "".join(out) == tok.decode(bad + world) == "\ufffd\ufffd world" and out[0].startswith("\ufffd\ufffd")


def test_stream_byte_level_tokenizer_holds_partial_characters():
    """GPT-2-style ByteLevel BPE (no byte pieces): partial UTF-8 decodes to U+FFFD and is held back."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tk.train_from_iterator(["hello world, hello there"] * 5, trainer=trainer)
    tok = Tokenizer.from_tokenizer(tk, eos_token="<|endoftext|>")
    assert not tok.byte_piece_ids and not tok.add_bos
    text = "hi 🦀 你好 there"
    ids = tok.encode(text) + [tok.eos_token_id]
    assert len(ids) > len(text.split())  # the emoji and CJK are split over several byte-level tokens
    chunks = _stream(tok, ids, True)
    assert "".join(chunks) == text == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks) and chunks.count("") > 2


def _copy(folders, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(folders["phi3-mini-june", "model"], d)
    return d


def test_missing_or_corrupt_files_raise_model_file_error(folders, tmp_path):
    d = _copy(folders, tmp_path)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ModelFileError) as e:
        Tokenizer.from_folder(d)
    assert e.value.path.endswith("tokenizer.json")
    (d / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}', encoding="utf-8")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_folder(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError) as e:
        Tokenizer.from_folder(d)
    assert e.value.path.endswith("tokenizer.json")
    d2 = _copy(folders, tmp_path / "2")
    (d2 / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFileError) as e:
        Tokenizer.from_folder(d2)
    assert e.value.path.endswith("tokenizer_config.json")


def test_added_token_id_mismatch_is_an_error(folders, tmp_path):
    d = _copy(folders, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    entries = cfg["added_tokens_decoder"]
    entries["600"] = entries.pop(str(phi_special_ids(d)["<|user|>"]))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ModelFileError, match="<\\|user\\|>"):
        Tokenizer.from_folder(d)


def test_chat_template_sources(folders, tmp_path):
    d = _copy(folders, tmp_path)
    assert Tokenizer.from_folder(d).chat_template.startswith("{% for message in messages %}")
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert Tokenizer.from_folder(d).chat_template == "D"
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert Tokenizer.from_folder(d).chat_template is None
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J"}), encoding="utf-8")
    assert Tokenizer.from_folder(d).chat_template == "J"
    (d / "chat_template.jinja").write_text("{{ 'K' }}", encoding="utf-8")
    assert Tokenizer.from_folder(d).chat_template == "{{ 'K' }}"


def test_from_tokenizer(pairs):
    import tokenizers

    src, _ = pairs["phi3-mini-june", "model"]
    tk = tokenizers.Tokenizer.from_str(src.backend.to_str())
    tok = Tokenizer.from_tokenizer(tk, bos_token="<s>", eos_token="<|end|>", add_bos=True, chat_template="X")
    assert tok.encode("Hi") == [1] + src.encode("Hi") and tok.eos_token_id == src.token_to_id("<|end|>")
    assert tok.chat_template == "X" and tok.special_ids == src.special_ids
    with pytest.raises(ConfigError) as e:
        Tokenizer.from_tokenizer(tk, bos_token="<bos>", add_bos=True)
    assert e.value.field == "add_bos_token"
