"""Load a GGUF file (llama.cpp's format, as Microsoft and Ollama publish Phi-3) into our models.

Metadata becomes the HF-style config of the architecture's ModelArgs; llama.cpp tensor names
map onto HF names; quantized tensors are dequantized at load (exactly as ggml does) into the
chosen dtype. The GGUFFile stays open on the result so quantized blocks remain available.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, UnsupportedModelError, WeightError
from ..gguf import GGUFFile, open_gguf
from ..text.gguf_tokenizer import tokenizer_from_gguf_metadata
from ..models import get_model_module
from ..models.base import require_float, require_int
from .hf import LoadedModel, build_model, check_chat_template, check_config_sizes, parse_device, resolve_dtype
from .memory import FileMappings, release_pages

# llama.cpp tensor names (per layer after "blk.N.") -> HF names (after "model.layers.N.")
_LAYER_NAMES = {
    "phi3": {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
    "gemma3": {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm"},
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_SKIP = {"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(arch: str, name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_NAMES[arch]:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[arch][m.group(2)]}.{m.group(3)}"
    return None


def _get(meta: dict[str, Any], key: str, default: Any = ..., kind: type = int) -> Any:
    """A metadata value, checked: a positive integer (kind=int) or a number (kind=float)."""
    if key not in meta or meta[key] is None:
        if default is ...:
            raise ConfigError(key, "is required in the GGUF metadata but missing")
        return default
    return require_int(key, meta[key]) if kind is int else require_float(key, meta[key])


def _eos_ids(meta: dict[str, Any], vocab: int) -> list[int]:
    out = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        i = meta.get(key)
        if i is None:
            continue
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise ConfigError(key, f"must be a token id in [0, {vocab}), got {i!r}")
        out.append(i)
    return out


def _check_heads(hidden: int, heads: int, key: str) -> None:
    if heads > hidden or hidden % heads:
        raise ConfigError(key, f"{heads} heads do not divide the embedding length {hidden}")


# config field -> the metadata key it comes from (for errors naming what the file says)
_KEYS = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
         "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
         "intermediate_size": "feed_forward_length", "head_dim": "attention.key_length"}


def _check_sizes(f: GGUFFile, arch: str, cfg: dict[str, Any]) -> None:
    """block_count must match the blk.N tensors and every size must fit the tensor infos, before a
    model (or a RoPE table) is built from them: block_count 10**8 once built a 10**8-entry set first."""
    layers = {int(m.group(1)) for name in f.tensors if (m := _BLK.match(name))}
    shapes = {name: info.shape for name, info in f.tensors.items()}
    check_config_sizes(cfg, shapes, f.path, layers=layers, keys={k: f"{arch}.{v}" for k, v in _KEYS.items()})


def _phi3_config(f: GGUFFile) -> dict[str, Any]:
    m, a = f.metadata, "phi3"
    hidden, heads = _get(m, f"{a}.embedding_length"), _get(m, f"{a}.attention.head_count")
    _check_heads(hidden, heads, f"{a}.attention.head_count")
    ctx = _get(m, f"{a}.context_length")
    cfg: dict[str, Any] = dict(
        model_type="phi3", hidden_size=hidden, num_hidden_layers=_get(m, f"{a}.block_count"),
        num_attention_heads=heads, num_key_value_heads=_get(m, f"{a}.attention.head_count_kv", heads),
        intermediate_size=_get(m, f"{a}.feed_forward_length"), max_position_embeddings=ctx,
        rms_norm_eps=_get(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        rope_theta=_get(m, f"{a}.rope.freq_base", 10000.0, kind=float),
        sliding_window=_get(m, f"{a}.attention.sliding_window", None),
        vocab_size=f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else None,
    )
    head_dim = hidden // heads
    rot = _get(m, f"{a}.rope.dimension_count", head_dim)
    if rot > head_dim:
        raise ConfigError(f"{a}.rope.dimension_count", f"{rot} is more than the head dimension {head_dim}")
    cfg["partial_rotary_factor"] = rot / head_dim
    if "rope_factors_long.weight" in f.tensors:  # LongRoPE: the factor lists travel as tensors
        orig = _get(m, f"{a}.rope.scaling.original_context_length")
        cfg["original_max_position_embeddings"] = orig
        cfg["rope_scaling"] = {
            "type": "longrope",
            "long_factor": f.tensor("rope_factors_long.weight").tolist(),
            "short_factor": f.tensor("rope_factors_short.weight").tolist(),
            "attention_factor": _get(m, f"{a}.rope.scaling.attn_factor", None, kind=float),
        }
    if cfg["sliding_window"] is not None and cfg["sliding_window"] >= ctx:
        cfg["sliding_window"] = None  # a window as long as the context is no window
    return cfg


def _gemma3_config(f: GGUFFile) -> dict[str, Any]:
    m, a = f.metadata, "gemma3"
    head_dim = _get(m, f"{a}.attention.key_length", 256)
    hidden, heads, layers = (_get(m, f"{a}.embedding_length"), _get(m, f"{a}.attention.head_count"),
                             _get(m, f"{a}.block_count"))
    scaling = None
    kind = m.get(f"{a}.rope.scaling.type")
    if kind not in (None, "none"):  # llama.cpp writes linear x8 for Gemma 3 4B / 12B / 27B global layers
        if kind != "linear":
            raise ConfigError(f"{a}.rope.scaling.type", f"unsupported rope scaling {kind!r} (supported: linear)")
        scaling = {"rope_type": "linear", "factor": _get(m, f"{a}.rope.scaling.factor", kind=float)}
    # llama.cpp: attention scale 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(hidden / heads)
    scalar = hidden // heads if layers == 62 else head_dim
    return dict(
        model_type="gemma3", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=_get(m, f"{a}.attention.head_count_kv", 1), head_dim=head_dim,
        intermediate_size=_get(m, f"{a}.feed_forward_length"),
        max_position_embeddings=_get(m, f"{a}.context_length"),
        rms_norm_eps=_get(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-6, kind=float),
        rope_theta=_get(m, f"{a}.rope.freq_base", 1_000_000.0, kind=float),
        rope_local_base_freq=10_000.0, rope_scaling=scaling,  # llama.cpp's local base
        sliding_window=_get(m, f"{a}.attention.sliding_window", 512), sliding_window_pattern=6,
        query_pre_attn_scalar=scalar, tie_word_embeddings="output.weight" not in f.tensors,
        norm_offset=0.0,  # the converter stored (1 + w)
        final_logit_softcapping=_get(m, f"{a}.final_logit_softcapping", None, kind=float),
        vocab_size=f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else None,
    )


_CONFIGS: dict[str, Callable[[GGUFFile], dict[str, Any]]] = {"phi3": _phi3_config, "gemma3": _gemma3_config}
_MODULES = {"phi3": "phi3", "gemma3": "gemma3_text"}


_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16
_LOW_BIT_TYPES = {2, 3, 10, 11, 12, 16, 17, 18, 19, 20, 21, 22, 23, 29, 34, 35, 39, 40, 41}  # <= 4-ish bits


def load_gguf(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
              quant: str | None = None, group_size: int | None = None) -> LoadedModel:
    """quant: None / "auto" runs the file's quantized linear weights in their own format on CPU
    (Q4_0/Q4_1/Q4_K -> int4, Q5_x/Q6_K/Q8_0 -> int8, losslessly; other types are dequantized and
    re-quantized once), "none" dequantizes everything into `dtype`, "int8" / "int4" also
    quantize the file's float linear weights."""
    from ..quant.gguf_repack import repack
    from ..quant.linear import apply_quant, quantize_model

    f = open_gguf(path)
    arch = f.architecture
    if arch not in _CONFIGS:
        raise UnsupportedModelError(f"{f.path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(_CONFIGS))})")
    cfg = _CONFIGS[arch](f)
    if cfg.get("vocab_size") is None:
        raise WeightError("token_embd.weight", "missing from the GGUF file", path=f.path)
    _check_sizes(f, arch, cfg)
    cfg["eos_token_id"] = _eos_ids(f.metadata, cfg["vocab_size"]) or None
    module = get_model_module(_MODULES[arch])
    args = module.ModelArgs.from_dict(cfg, path=f.path)
    dev = parse_device(device)
    dt = resolve_dtype(dtype, dev)
    weights: dict[str, torch.Tensor] = {}
    quantized: dict[str, Any] = {}
    requant: dict[str, str] = {}  # linear weight -> the scheme its (non-repackable) blocks go to
    names: dict[str, str] = {}  # HF name -> the file's name, for error messages
    maps = FileMappings()
    run_quantized = dev.type == "cpu" and quant != "none"
    tied = "output.weight" not in f.tensors
    for name in f.tensors:
        if name in _SKIP:
            continue
        target = hf_name(arch, name)
        if target is None:
            raise WeightError(name, f"is not a tensor of a GGUF {arch} model", path=f.path)
        names[target] = name
        info = f.tensors[name]
        if run_quantized and info.ggml_type not in _FLOAT_TYPES and len(info.shape) == 2:
            linear = "lm_head.weight" if name == "token_embd.weight" and tied else (
                None if name == "token_embd.weight" else target)
            if linear is not None:
                qw = repack(f.raw(name), info.ggml_type, info.shape)
                names.setdefault(linear, name)
                if qw is not None:
                    quantized[linear] = qw
                else:
                    requant[linear] = "int4" if info.ggml_type in _LOW_BIT_TYPES else "int8"
                if linear == target and qw is not None:
                    release_pages(f.raw(name), maps)  # repacked: the mapped file pages can go
                    continue
                # the embedding itself (also the tied output's source) is dequantized below
        weights[target] = t = f.tensor(name, dtype=dt)
        raw = f.raw(name)
        if t.data_ptr() != raw.data_ptr():  # a converted copy: the mapped file pages can go
            release_pages(raw, maps)
    try:
        model = build_model(module, args, weights, dt, dev, f.path, quantized=quantized)
    except WeightError as e:  # name the tensor as the file does
        msg = str(e).split(f"tensor '{e.tensor}': ", 1)[-1]
        raise WeightError(names.get(e.tensor.removesuffix(".qweight"), e.tensor), msg, path=f.path) from None
    for scheme in ("int8", "int4"):
        todo = {k.removesuffix(".weight") for k, v in requant.items() if v == scheme}
        if todo:
            quantize_model(model, scheme, None, skip=lambda n, todo=todo: n not in todo)
    apply_quant(model, quant, group_size)
    tokenizer = tokenizer_from_gguf_metadata(f.metadata)
    check_chat_template(tokenizer, "tokenizer.chat_template", f.path)
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError("tokenizer.ggml.tokens", f"lists {tokenizer.vocab_size} tokens but the embedding has "
                          f"{args.vocab_size} rows")
    gen_cfg = {"eos_token_id": cfg["eos_token_id"]} if cfg["eos_token_id"] else {}
    name = str(f.metadata.get("general.name") or Path(path).stem)
    return LoadedModel(model, args, tokenizer, dt, dev, name, gen_cfg, gguf=f, config=cfg)
