"""Seeded mutators that turn valid tiny model files into hostile ones, for the file fuzz.

Every mutation is a pure function of (seed file, random.Random): the same index of the same run
gives the same input, so a failure is reproducible from its index. GGUF mutations aim at the header
(counts, lengths, value types, metadata values, tensor infos: where readers go wrong) with byte-level
noise on top; folder mutations edit one file of a Hugging Face folder at the JSON level (wrong types,
huge or non-finite numbers, deep nesting, broken chat templates) or the byte level (truncation, bit
flips, the safetensors header).
"""
from __future__ import annotations

import json
import random
import struct
from typing import Any

from tests.helpers.gguf_files import Layout

# --------------------------------------------------------------------------------------- values
U64_EDGES = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 256, 4096, 2**15, 2**16, 2**24, 2**31 - 1, 2**31, 2**32 - 1,
             2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_EDGES = [0.0, -0.0, 1e-45, 1e-30, 1.0, -1.0, 0.5, 1e30, 3.4e38, float("inf"), float("-inf"), float("nan")]
# metadata value types of GGUF: 0-12, and some that do not exist
VALUE_TYPES = list(range(13)) + [13, 255, 2**31, 2**32 - 1]


def edge_int(rng: random.Random, bits: int = 64) -> int:
    v = rng.choice(U64_EDGES) if rng.random() < 0.8 else rng.getrandbits(bits)
    return v % (1 << bits)


# ----------------------------------------------------------------------------------------- GGUF
def _put(data: bytearray, at: int, fmt: str, value: Any) -> None:
    size = struct.calcsize(fmt)
    if 0 <= at and at + size <= len(data):
        data[at:at + size] = struct.pack(fmt, value)


def _kv_value(data: bytearray, layout: Layout, rng: random.Random) -> str:
    key = rng.choice(sorted(layout.kv))
    kv = layout.kv[key]
    (vtype,) = struct.unpack_from("<I", data, kv.type)
    choice = rng.random()
    if choice < 0.15:  # a different value type, same bytes: the reader must bounds-check the new type
        new = rng.choice(VALUE_TYPES)
        _put(data, kv.type, "<I", new)
        return f"kv {key}: type {vtype} -> {new}"
    if kv.array_count is not None and choice < 0.5:
        n = edge_int(rng)
        _put(data, kv.array_count, "<Q", n)
        return f"kv {key}: array length -> {n}"
    if vtype == 8 and choice < 0.5:  # a string: its length
        n = edge_int(rng)
        _put(data, kv.value, "<Q", n)
        return f"kv {key}: string length -> {n}"
    if choice < 0.6:  # the key's own length
        n = edge_int(rng)
        _put(data, kv.start, "<Q", n)
        return f"kv {key}: key length -> {n}"
    if vtype in (6, 12):
        v = rng.choice(FLOAT_EDGES)
        _put(data, kv.value, "<f" if vtype == 6 else "<d", v)
        return f"kv {key}: value -> {v}"
    fmt = {0: "<B", 1: "<B", 2: "<H", 3: "<H", 4: "<I", 5: "<I", 7: "<B", 10: "<Q", 11: "<Q"}.get(vtype, "<I")
    v = edge_int(rng, 8 * struct.calcsize(fmt))
    _put(data, kv.value, fmt, v)
    return f"kv {key}: value -> {v}"


def _tensor_info(data: bytearray, layout: Layout, rng: random.Random) -> str:
    name = rng.choice(sorted(layout.tensors))
    t = layout.tensors[name]
    field = rng.choice(["name_len", "n_dims", "dim", "dim", "type", "offset", "offset"])
    if field == "name_len":
        v = edge_int(rng)
        _put(data, t.start, "<Q", v)
    elif field == "n_dims":
        v = rng.choice([0, 1, 2, 3, 4, 5, 8, 2**31, 2**32 - 1])
        _put(data, t.n_dims, "<I", v)
    elif field == "dim":
        (n_dims,) = struct.unpack_from("<I", data, t.n_dims)
        j = rng.randrange(max(1, min(n_dims, 4)))
        v = edge_int(rng)
        _put(data, t.dims + 8 * j, "<Q", v)
    elif field == "type":
        v = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 16, 24, 30, 39, 40, 41, 2**31, 2**32 - 1])
        _put(data, t.type, "<I", v)
    else:
        v = edge_int(rng) if rng.random() < 0.5 else struct.unpack_from("<Q", data, t.offset)[0] + rng.choice(
            [-64, -32, -8, -1, 1, 8, 32, 64])
        _put(data, t.offset, "<Q", v % 2**64)
    return f"tensor {name}: {field} -> {v}"


def _header(data: bytearray, layout: Layout, rng: random.Random) -> str:
    field = rng.choice(["version", "tensor_count", "metadata_kv_count"])
    if field == "version":
        v = rng.choice([0, 1, 2, 3, 4, 2**24, 2**32 - 1])
        _put(data, layout.header["version"], "<I", v)
    else:
        (old,) = struct.unpack_from("<Q", data, layout.header[field])
        v = edge_int(rng) if rng.random() < 0.7 else max(0, old + rng.choice([-2, -1, 1, 2]))
        _put(data, layout.header[field], "<Q", v % 2**64)
    return f"header {field} -> {v}"


def _bit_flips(data: bytearray, layout: Layout, rng: random.Random) -> str:
    end = layout.data_start if rng.random() < 0.9 else len(data)  # mostly the header: that is what is parsed
    spots = [rng.randrange(end) for _ in range(rng.randint(1, 8))]
    for at in spots:
        data[at] ^= 1 << rng.randrange(8)
    return f"bit flips at {spots}"


def _truncate(data: bytearray, layout: Layout, rng: random.Random) -> str:
    at = rng.randrange(layout.data_start + 64) if rng.random() < 0.8 else rng.randrange(len(data))
    del data[at:]
    return f"truncated to {at} bytes"


GGUF_MUTATORS = [(_kv_value, 5), (_tensor_info, 4), (_header, 1), (_bit_flips, 2), (_truncate, 1)]


def mutate_gguf(seed: bytes, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One hostile variant of a GGUF file: 1-3 mutations, offsets found by gguf's own reader."""
    data = bytearray(seed)
    funcs, weights = zip(*GGUF_MUTATORS)
    chosen = [rng.choices(funcs, weights)[0] for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    chosen.sort(key=lambda f: f is _truncate)  # cut last: the others patch offsets of the whole file
    steps = [f(data, layout, rng) for f in chosen]
    return bytes(data), "; ".join(steps)


# --------------------------------------------------------------------------------------- folders
CONFIG_FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                 "original_max_position_embeddings", "rope_theta", "rope_local_base_freq", "rope_scaling",
                 "rope_parameters", "partial_rotary_factor", "rms_norm_eps", "sliding_window",
                 "sliding_window_pattern", "layer_types", "hidden_act", "hidden_activation", "tie_word_embeddings",
                 "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "eos_token_id",
                 "quantization_config"]
GENERATION_FIELDS = ["do_sample", "temperature", "top_p", "top_k", "eos_token_id", "bos_token_id",
                     "max_new_tokens", "repetition_penalty"]
TOKENIZER_JSON_FIELDS = ["model", "normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens",
                         "truncation", "padding"]
TOKENIZER_FIELDS = ["chat_template", "bos_token", "eos_token", "add_bos_token", "add_eos_token",
                    "added_tokens_decoder", "additional_special_tokens", "legacy", "model_max_length"]
BROKEN_TEMPLATES = [
    "{{ 1 / 0 }}", "{% for m in messages %}", "{{ messages[7]['content'] }}", "{{ raise_exception('no') }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ nothing.at.all }}", "{{ ''.__class__.__mro__ }}",
    "{{ messages | tojson(indent='x') }}", "{{ (messages[0]['content'] * 1000) | length }}",
    "{% for i in range(10**9) %}{% endfor %}", "{{ bos_token + 5 }}", "{% if %}", "{{ strftime_now(5) }}",
]


def weird_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of the wrong type, size or finiteness."""
    pool: list[Any] = [None, True, False, -1, 0, 1, 2, 3, 7, 8, 2**31, 2**63, 10**18, -(2**63), 10**400, 1e308,
                       -0.0, 0.5, 1e-45, float("nan"), float("inf"), float("-inf"), "", "x", "1e4", "\ud800",
                       [], [1], [None], ["full_attention"] * 3, {}, {"a": 1}]
    if depth < 2 and rng.random() < 0.15:
        return {rng.choice(["rope_type", "type", "factor", "rope_theta", "short_factor", "long_factor",
                            "partial_rotary_factor", "full_attention", "sliding_attention", "quant_method",
                            "attention_factor", "original_max_position_embeddings"]): weird_value(rng, depth + 1)
                for _ in range(rng.randint(1, 3))}
    if depth < 2 and rng.random() < 0.1:
        return [weird_value(rng, depth + 1) for _ in range(rng.randint(1, 5))]
    return rng.choice(pool)


def _json_edit(text: str, fields: list[str], rng: random.Random) -> tuple[str, str]:
    obj = json.loads(text)
    steps = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        key = rng.choice(fields + list(obj) if isinstance(obj, dict) else fields)
        if rng.random() < 0.15:
            obj.pop(key, None)
            steps.append(f"del {key}")
            continue
        cur = obj.get(key)
        if isinstance(cur, dict) and cur and rng.random() < 0.6:  # one level down (rope_parameters.rope_theta)
            sub = rng.choice(sorted(cur))
            cur[sub] = weird_value(rng)
            steps.append(f"{key}.{sub} = {cur[sub]!r:.60}")
            continue
        obj[key] = weird_value(rng)
        steps.append(f"{key} = {obj[key]!r:.60}")
    return json.dumps(obj), "; ".join(steps)


def _text_noise(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    choice = rng.random()
    if choice < 0.3:
        at = rng.randrange(len(data) + 1)
        return data[:at], f"truncated to {at}"
    if choice < 0.55:
        out = bytearray(data)
        spots = [rng.randrange(len(out)) for _ in range(rng.randint(1, 6))] if out else []
        for at in spots:
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out), f"bit flips at {spots}"
    if choice < 0.75:
        depth = rng.choice([100, 1000, 50_000])
        return (b"[" * depth + b"]" * depth), f"nested {depth} deep"
    if choice < 0.9:
        return b'{"hidden_size": ' + b"9" * rng.choice([400, 5000]) + b"}", "a huge integer"
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))), "random bytes"


def _safetensors_edit(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Edit the safetensors header: its length prefix, or one tensor's dtype / shape / offsets."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    choice = rng.random()
    if choice < 0.2:
        v = edge_int(rng)
        return struct.pack("<Q", v) + data[8:], f"header length -> {v}"
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    what = rng.choice(["dtype", "shape", "shape", "data_offsets", "metadata"])
    if what == "dtype":
        header[name]["dtype"] = rng.choice(["F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", 5])
    elif what == "shape":
        shape = list(header[name]["shape"])
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 2**31, 2**62, -1])
        else:
            shape = rng.choice([[], [1, 1, 1, 1, 1, 1, 1], [2**40, 2**40]])
        header[name]["shape"] = shape
    elif what == "data_offsets":
        header[name]["data_offsets"] = [edge_int(rng, 63), edge_int(rng, 63)]
    else:
        header["__metadata__"] = {"slmkit.quant": rng.choice(["{", "[" * 5000 + "]" * 5000, json.dumps(
            {name.rsplit(".", 1)[0]: {"bits": 4, "group": 32, "zero": 0, "n": 2**40, "k": 2**40}})])}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body, f"header {name} {what}"


def mutate_folder_file(name: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A hostile variant of one file of a model folder (by its file name)."""
    if name == "model.safetensors":
        return _safetensors_edit(data, rng) if rng.random() < 0.7 else _text_noise(data, rng)
    fields = {"config.json": CONFIG_FIELDS, "generation_config.json": GENERATION_FIELDS,
              "tokenizer_config.json": TOKENIZER_FIELDS, "tokenizer.json": TOKENIZER_JSON_FIELDS}.get(name)
    if name == "tokenizer_config.json" and rng.random() < 0.4:
        obj = json.loads(data)
        obj["chat_template"] = rng.choice(BROKEN_TEMPLATES)
        return json.dumps(obj).encode(), f"chat_template = {obj['chat_template']!r}"
    if fields is not None and rng.random() < 0.75:
        text, what = _json_edit(data.decode("utf-8"), fields, rng)
        return text.encode("utf-8", "surrogatepass"), what
    return _text_noise(data, rng)
