"""open_gguf: reads well-formed files, and rejects malformed ones quickly, with bounded memory,
with a GGUFError whose ``field`` names the culprit."""
from __future__ import annotations

import gc
import pickle
import time
import tracemalloc

import numpy as np
import pytest
import torch

from slmkit.errors import ModelFileError, WeightError
from slmkit.gguf import GGUFError, GGUFFile, open_gguf
from tests.helpers.gguf_files import (
    copy_file,
    gguf_layout,
    patch_bytes,
    patch_u32,
    patch_u64,
    quantize,
    read_u64,
    reference_dequantize,
    truncate,
    write_gguf,
)

TOKENS = ["<s>", "</s>", "hello", "wörld", "▁the"]
METADATA = {
    "tiny.context_length": 4096,
    "tiny.rope.freq_base": 10000.0,
    "tiny.use_parallel_residual": True,
    "tiny.signed": -7,
    "tiny.big": 2**40,
    "tiny.dup_a": 1,
    "tiny.dup_b": 2,
    "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.scores": [0.0, -1.5, 2.25, 0.5, -0.125],
    "general.name": "tiny test model",  # last, so a cut inside it passes the kv_count bound
}
# name -> (torch shape, type). The two blk.0.* tensors have equal-length names and equal sizes.
TENSORS = {
    "token_embd.weight": ((8, 64), "F32"),
    "blk.0.attn_q.weight": ((16, 64), "Q4_0"),
    "blk.0.attn_k.weight": ((16, 64), "Q4_0"),
    "blk.0.ffn_norm.weight": ((64,), "F16"),
    "output.weight": ((8, 64), "Q8_0"),
}
FIRST, SECOND = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
LAST = "output.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = {name: (rng.standard_normal(shape).astype(np.float32), t) for name, (shape, t) in TENSORS.items()}
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "base.gguf", "tiny", METADATA, data, alignment=32)
    return path, data, gguf_layout(path)


@pytest.fixture
def bad(base, tmp_path):
    """A fresh copy of the base file to corrupt, plus its layout."""
    path, _, layout = base
    return copy_file(path, tmp_path / "bad.gguf"), layout


def expect_error(path, field: str, fragment: str | None = None) -> GGUFError:
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as exc:
            open_gguf(path)
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    err = exc.value
    assert err.field == field, str(err)
    assert str(path) in str(err) and f"field '{field}'" in str(err)
    if fragment is not None:
        assert fragment in str(err), str(err)
    assert elapsed < 1.0, elapsed
    assert peak < 8 * 2**20, peak
    return err


# ------------------------------------------------------------------------- well-formed
def test_reads_header_metadata_and_tensor_infos(base):
    path, data, layout = base
    with open_gguf(path) as f:
        assert isinstance(f, GGUFFile)
        assert f.path == path and f.version == 3 and f.alignment == 32
        assert f.architecture == "tiny"
        m = f.metadata
        assert m["general.architecture"] == "tiny"
        assert m["general.alignment"] == 32
        assert m["general.name"] == "tiny test model"
        assert m["tiny.context_length"] == 4096 and type(m["tiny.context_length"]) is int
        assert m["tiny.rope.freq_base"] == 10000.0 and type(m["tiny.rope.freq_base"]) is float
        assert m["tiny.use_parallel_residual"] is True
        assert m["tiny.signed"] == -7 and m["tiny.big"] == 2**40
        assert list(m["tokenizer.ggml.tokens"]) == TOKENS
        assert list(m["tokenizer.ggml.scores"]) == METADATA["tokenizer.ggml.scores"]

        assert list(f.tensors) == list(TENSORS)  # file order
        for name, (shape, type_name) in TENSORS.items():
            info = f.tensors[name]
            assert info.name == name and info.shape == shape and info.type_name == type_name
            assert info.offset == layout.tensors[name].data and info.nbytes == layout.tensors[name].nbytes
            assert info.offset % 32 == 0 and info.offset >= f.data_offset == layout.data_start

        x = data["token_embd.weight"][0]
        assert torch.equal(f.tensor("token_embd.weight"), torch.from_numpy(x))
        q = quantize(data[FIRST][0], "Q4_0")
        assert torch.equal(f.tensor(FIRST), torch.from_numpy(reference_dequantize(q, "Q4_0")))
        norm = f.tensor("blk.0.ffn_norm.weight", torch.float16)
        expected = torch.from_numpy(data["blk.0.ffn_norm.weight"][0].astype(np.float16))
        assert norm.dtype == torch.float16 and torch.equal(norm, expected)


def test_raw_is_zero_copy_from_one_map(base):
    path, _, _ = base
    with open_gguf(path) as f:
        a, b = f.raw(FIRST), f.raw(LAST)
        assert a.dtype == torch.uint8 and a.dim() == 1 and a.numel() == f.tensors[FIRST].nbytes
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert a.data_ptr() - a.untyped_storage().data_ptr() == f.tensors[FIRST].offset
        with open(path, "rb") as fh:
            fh.seek(f.tensors[FIRST].offset)
            assert bytes(a.numpy()) == fh.read(a.numel())


def test_views_outlive_close_and_never_write_the_file(base):
    path, _, _ = base
    before = path.read_bytes()
    f = open_gguf(path)
    emb = f.tensor("token_embd.weight")
    raw = f.raw(LAST)
    f.close()
    f.close()  # idempotent
    emb.add_(1)  # private copy-on-write map: allowed, but never reaches the file
    assert raw.sum().item() >= 0
    assert path.read_bytes() == before
    with pytest.raises(ModelFileError, match="closed"):
        f.raw(LAST)


def test_unknown_tensor_name(base):
    with open_gguf(base[0]) as f, pytest.raises(WeightError) as exc:
        f.tensor("nope")
    assert exc.value.tensor == "nope"


def test_version_2_and_custom_alignment(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"a": (rng.standard_normal((3, 32)).astype(np.float32), "Q8_0"),
               "b": (rng.standard_normal((5,)).astype(np.float32), "F32")}
    path = write_gguf(tmp_path / "a64.gguf", "tiny", {}, tensors, alignment=64)
    patch_u32(path, 4, 2)
    with open_gguf(path) as f:
        assert f.version == 2 and f.alignment == 64
        assert all(t.offset % 64 == 0 for t in f.tensors.values())
        assert torch.equal(f.tensor("b"), torch.from_numpy(tensors["b"][0]))


def test_file_without_tensors(tmp_path):
    path = write_gguf(tmp_path / "vocab.gguf", "tiny", {"tokenizer.ggml.tokens": ["a", "b"]}, {})
    with open_gguf(path) as f:
        assert f.tensors == {} and f.metadata["tokenizer.ggml.tokens"] == ["a", "b"]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found") as exc:
        open_gguf(tmp_path / "missing.gguf")
    assert not isinstance(exc.value, GGUFError)
    with pytest.raises(ModelFileError, match="directory"):
        open_gguf(tmp_path)


# --------------------------------------------------------------------------- truncation
def test_empty_and_tiny_files(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect_error(p, "magic")
    p.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    expect_error(p, "header", "smaller than")


def test_truncated_in_metadata_string(bad):
    path, layout = bad
    truncate(path, layout.kv["general.name"].value + 8 + 3)
    expect_error(path, "general.name", "truncated")


def test_truncated_in_metadata_array(bad):
    path, layout = bad
    truncate(path, layout.kv["tokenizer.ggml.tokens"].array_items + 5)
    expect_error(path, "tokenizer.ggml.tokens")


def test_truncated_in_tensor_info(bad):
    path, layout = bad
    truncate(path, layout.tensors[LAST].dims + 4)
    expect_error(path, LAST, "truncated")


def test_truncated_early_is_caught_by_the_count_bounds(bad):
    path, layout = bad
    truncate(path, layout.kv["general.architecture"].value + 4)
    expect_error(path, "metadata_kv_count", "cannot fit")


def test_truncated_in_tensor_data(bad):
    path, layout = bad
    t = layout.tensors[LAST]
    truncate(path, t.data + t.nbytes - 1)
    expect_error(path, LAST, "extends past end of file")


def test_truncated_right_after_tensor_infos(bad):
    path, layout = bad
    truncate(path, layout.tensor_infos_end)
    expect_error(path, "token_embd.weight", "extends past end of file")


# ------------------------------------------------------------------------- fixed header
def test_bad_magic(bad):
    path, _ = bad
    patch_bytes(path, 0, b"GGML")
    expect_error(path, "magic", "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_bad_version(bad, version):
    path, layout = bad
    patch_u32(path, layout.header["version"], version)
    expect_error(path, "version", "unsupported GGUF version")


def test_big_endian_file(bad):
    path, layout = bad
    patch_bytes(path, layout.header["version"], (3).to_bytes(4, "big"))
    expect_error(path, "version", "big-endian")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1])
def test_huge_tensor_count(bad, count):
    path, layout = bad
    patch_u64(path, layout.header["tensor_count"], count)
    expect_error(path, "tensor_count", str(count))


def test_tensor_count_too_big_for_bytes_after_metadata(bad):
    path, layout = bad
    # Fits the whole file, but not what is left after the metadata.
    patch_u64(path, layout.header["tensor_count"], (layout.size - 24) // 32)
    expect_error(path, "tensor_count", "after the metadata")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1])
def test_huge_kv_count(bad, count):
    path, layout = bad
    patch_u64(path, layout.header["metadata_kv_count"], count)
    expect_error(path, "metadata_kv_count", str(count))


# ----------------------------------------------------------------------------- metadata
def test_huge_string_value_length(bad):
    path, layout = bad
    patch_u64(path, layout.kv["general.name"].value, 2**62)
    expect_error(path, "general.name", str(2**62))


def test_huge_key_length(bad):
    path, layout = bad
    keys = list(layout.kv)
    i = keys.index("general.name")
    patch_u64(path, layout.kv["general.name"].start, 2**63)
    expect_error(path, f"metadata_kv[{i}].key", str(2**63))


def test_invalid_utf8_key(bad):
    path, layout = bad
    i = list(layout.kv).index("general.name")
    patch_bytes(path, layout.kv["general.name"].key, b"\xff")
    expect_error(path, f"metadata_kv[{i}].key", "UTF-8")


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores"])
def test_huge_array_length(bad, key):
    path, layout = bad
    patch_u64(path, layout.kv[key].array_count, 2**61)
    expect_error(path, key, "array length")


def test_huge_string_length_inside_array(bad):
    path, layout = bad
    patch_u64(path, layout.kv["tokenizer.ggml.tokens"].array_items, 2**40)
    expect_error(path, "tokenizer.ggml.tokens")


def test_lazy_string_arrays_read_as_the_lists(base):
    """open_gguf(lazy_strings=True) (the loader's): string arrays decoded on first use, equal to the lists."""
    path, _, _ = base
    with open_gguf(path) as eager, open_gguf(path, lazy_strings=True) as lazy:
        tokens = lazy.metadata["tokenizer.ggml.tokens"]
        assert isinstance(eager.metadata["tokenizer.ggml.tokens"], list) and not isinstance(tokens, list)
        assert len(tokens) == len(TOKENS) and tokens == TOKENS and list(tokens) == TOKENS
        assert tokens[3] == "wörld" and tokens[-2:] == TOKENS[-2:] and "hello" in tokens
        assert pickle.loads(pickle.dumps(tokens)) == TOKENS
        assert lazy.metadata.keys() == eager.metadata.keys()
        assert all(lazy.metadata[k] == v for k, v in eager.metadata.items() if k != "tokenizer.ggml.scores")


def test_lazy_string_arrays_check_lengths_while_parsing(bad):
    path, layout = bad
    patch_u64(path, layout.kv["tokenizer.ggml.tokens"].array_items, 2**40)
    with pytest.raises(GGUFError) as exc:
        open_gguf(path, lazy_strings=True)
    assert exc.value.field == "tokenizer.ggml.tokens"


def test_invalid_utf8_in_a_string_array(bad):
    """Parsed eagerly: refused at open. Lazily: refused where the strings are first read, same error."""
    path, layout = bad
    patch_bytes(path, layout.kv["tokenizer.ggml.tokens"].array_items + 8, b"\xff")  # token 0's first byte
    err = expect_error(path, "tokenizer.ggml.tokens", "string [0] is not valid UTF-8")
    with open_gguf(path, lazy_strings=True) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == len(TOKENS)
        with pytest.raises(GGUFError) as exc:
            tokens[1]
    assert exc.value.field == "tokenizer.ggml.tokens" and str(exc.value) == str(err)


def test_unknown_value_type(bad):
    path, layout = bad
    patch_u32(path, layout.kv["general.name"].type, 77)
    expect_error(path, "general.name", "77")


@pytest.mark.parametrize("item_type,fragment", [(9, "nested"), (13, "13")])
def test_bad_array_item_type(bad, item_type, fragment):
    path, layout = bad
    patch_u32(path, layout.kv["tokenizer.ggml.scores"].value, item_type)
    expect_error(path, "tokenizer.ggml.scores", fragment)


def test_bool_out_of_range(bad):
    path, layout = bad
    patch_bytes(path, layout.kv["tiny.use_parallel_residual"].value, b"\x02")
    expect_error(path, "tiny.use_parallel_residual", "0 or 1")


@pytest.mark.parametrize("alignment", [0, 48, 3, 1, 2, 4])
def test_alignment_not_power_of_two(bad, alignment):
    path, layout = bad
    patch_u32(path, layout.kv["general.alignment"].value, alignment)
    expect_error(path, "general.alignment", "power of two and a multiple of 8")


def test_alignment_one_is_refused_before_a_misaligned_tensor(tmp_path):
    """The GGUF spec wants a multiple of 8: with alignment 1 a Q8_0 tensor lands at an odd offset and
    its f16 scales could not be viewed (an untyped RuntimeError at load)."""
    rng = np.random.default_rng(2)
    tensors = {"a": (rng.standard_normal((3,)).astype(np.float32), "F32"),
               "b": (rng.standard_normal((2, 32)).astype(np.float32), "Q8_0")}
    expect_error(write_gguf(tmp_path / "a1.gguf", "tiny", {}, tensors, alignment=1), "general.alignment", "got 1")


def test_missing_architecture(bad):
    path, layout = bad
    patch_bytes(path, layout.kv["general.architecture"].key, b"general.architectur_")
    expect_error(path, "general.architecture", "missing")


def test_duplicate_metadata_key(bad):
    path, layout = bad
    patch_bytes(path, layout.kv["tiny.dup_b"].key, b"tiny.dup_a")
    expect_error(path, "tiny.dup_a", "duplicate metadata key")


# ------------------------------------------------------------------------- tensor infos
def test_huge_tensor_name_length(bad):
    path, layout = bad
    i = list(layout.tensors).index(SECOND)
    patch_u64(path, layout.tensors[SECOND].start, 2**62)
    expect_error(path, f"tensor_info[{i}].name", str(2**62))


def test_offset_past_end(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[FIRST].offset, 2**40)
    expect_error(path, FIRST, "extends past end of file")


def test_offset_near_u64_max(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[FIRST].offset, 2**64 - 32)
    expect_error(path, FIRST, "extends past end of file")


def test_misaligned_offset(bad):
    path, layout = bad
    off = layout.tensors[SECOND].offset
    patch_u64(path, off, read_u64(path, off) + 1)
    expect_error(path, SECOND, "alignment")


@pytest.mark.parametrize("type_id,fragment",
                         [(99, "unknown ggml type id 99"), (16, "16 (IQ2_XXS)"), (2**32 - 1, "4294967295")])
def test_unsupported_tensor_type(bad, type_id, fragment):
    path, layout = bad
    patch_u32(path, layout.tensors[SECOND].type, type_id)
    expect_error(path, SECOND, fragment)


def test_zero_dim(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[FIRST].dims + 8, 0)  # ggml ne[1] = torch dim 0
    expect_error(path, FIRST, "zero")


@pytest.mark.parametrize("n_dims", [0, 5, 9, 2**32 - 1])
def test_bad_n_dims(bad, n_dims):
    path, layout = bad
    patch_u32(path, layout.tensors[FIRST].n_dims, n_dims)
    expect_error(path, FIRST, f"n_dims is {n_dims}")


def test_first_dim_not_multiple_of_block(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[FIRST].dims, 48)  # Q4_0 blocks are 32 wide
    expect_error(path, FIRST, "block size 32")


def test_huge_dims_overflow(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[FIRST].dims, 2**63)
    patch_u64(path, layout.tensors[FIRST].dims + 8, 2**63)
    expect_error(path, FIRST, "extends past end of file")


def test_duplicate_tensor_name(bad):
    path, layout = bad
    assert len(FIRST) == len(SECOND)
    patch_bytes(path, layout.tensors[SECOND].name, FIRST.encode())
    expect_error(path, FIRST, "duplicate tensor name")


def test_overlapping_tensors(bad):
    path, layout = bad
    patch_u64(path, layout.tensors[SECOND].offset, read_u64(path, layout.tensors[FIRST].offset))
    expect_error(path, SECOND, f"overlaps tensor '{FIRST}'")


def test_partially_overlapping_tensors(bad):
    path, layout = bad
    # LAST starts 32 bytes before the end of the tensor that precedes it in the data section.
    prev = max((t for n, t in layout.tensors.items() if n != LAST), key=lambda t: t.data)
    start = prev.data + prev.nbytes - layout.data_start
    patch_u64(path, layout.tensors[LAST].offset, (start - 1) // 32 * 32)
    expect_error(path, LAST, "overlaps tensor")
