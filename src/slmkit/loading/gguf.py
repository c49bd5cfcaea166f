"""Load a GGUF file (llama.cpp's format, as Microsoft and Ollama publish Phi-3) into our models.

Metadata becomes the HF-style config of the architecture's ModelArgs; llama.cpp tensor names
map onto HF names; quantized tensors are dequantized at load (exactly as ggml does) into the
chosen dtype. The GGUFFile stays open on the result so quantized blocks remain available.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import ConfigError, UnsupportedModelError, WeightError
from ..gguf import GGUFFile, open_gguf
from ..gguf.quants import dequantize
from ..models import GGUF_ARCHITECTURES, get_model_module
from ..text.gguf_tokenizer import tokenizer_from_gguf_metadata
from . import gguf_cache
from .hf import LoadedModel, build_model, check_chat_template, check_config_sizes, parse_device, resolve_dtype
from .memory import FileMappings, release_pages

# llama.cpp tensor names outside the layers (per layer "blk.N.<name>": each model's GGUF_LAYER_NAMES)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output_norm.bias": "model.norm.bias", "output.weight": "lm_head.weight",
                 "output.bias": "lm_head.bias"}  # (the biases: phimoe's LayerNorm and lm_head)
_SKIP = {"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_module(f: GGUFFile) -> ModuleType:
    """The model module for the file's architecture (models.GGUF_ARCHITECTURES)."""
    arch = f.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{f.path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})")
    return get_model_module(GGUF_ARCHITECTURES[arch])


def hf_name(arch: str, name: str) -> str | None:
    """The HF name of a GGUF tensor of architecture `arch`, or None if it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.match(name)
    layer_names = get_model_module(GGUF_ARCHITECTURES[arch]).GGUF_LAYER_NAMES
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    return None


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


_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16
_LOW_BIT_TYPES = {2, 3, 10, 11, 12, 16, 17, 18, 19, 20, 21, 22, 23, 29, 34, 35, 39, 40, 41}  # <= 4-ish bits


def load_gguf(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
              quant: str | None = None, group_size: int | None = None) -> LoadedModel:
    """quant: None / "auto" runs the file's quantized linear weights in their own format on CPU
    (Q4_0/Q4_1/Q4_K -> int4, Q5_x/Q6_K/Q8_0 -> int8, losslessly; other types are dequantized and
    re-quantized once), "none" dequantizes everything into `dtype`, "int8" / "int4" also
    quantize the file's float linear weights."""
    from ..quant.linear import apply_quant, quantize_model

    f = open_gguf(path, lazy_strings=True)
    arch = f.architecture
    module = gguf_module(f)
    cfg = module.gguf_config(f)
    if "token_embd.weight" not in f.tensors:
        raise WeightError("token_embd.weight", "missing from the GGUF file", path=f.path)
    cfg["vocab_size"] = f.tensors["token_embd.weight"].shape[0]
    _check_sizes(f, arch, cfg)
    cfg["eos_token_id"] = _eos_ids(f.metadata, cfg["vocab_size"]) or None
    args = module.ModelArgs.from_dict(cfg, path=f.path)
    dev = parse_device(device)
    dt = resolve_dtype(dtype, dev)
    run_quantized = dev.type == "cpu" and quant != "none"
    mode = f"{dt}:{'quantized' if run_quantized else 'float'}"
    fp = gguf_cache.fingerprint(f.path, f.data_offset) if gguf_cache.cache_path(f.path, mode) else None
    work = gguf_cache.read(f.path, mode, fp) if fp else None
    if work is None:
        # the tensors on a thread of their own while this one builds the tokenizer: the repack runs in the
        # kernel library without the GIL, the tokenizer build (Python, numpy, tokenizers) mostly with it
        with ThreadPoolExecutor(1, thread_name_prefix="slmkit-gguf-load") as pool:
            job = pool.submit(_load_work, f, arch, module, dt, run_quantized)
            try:
                tokenizer = tokenizer_from_gguf_metadata(f.metadata)
            finally:
                work = job.result()  # a weight error comes first, as when this ran before the tokenizer
        if fp:  # written on a thread of its own: the model runs meanwhile
            gguf_cache.write_soon(f.path, mode, fp, work, tokenizer)
    else:  # the cached tokenizer, if it was built from this very file (the fingerprint matches)
        assert fp is not None  # (work came from the cache)
        cached = gguf_cache.read_tokenizer(f.path, mode, fp)
        if cached is None:  # absent or damaged beside valid weights: built again, and stored
            tokenizer = tokenizer_from_gguf_metadata(f.metadata)
            gguf_cache.write_soon(f.path, mode, fp, None, tokenizer)
        else:
            tokenizer = cached
    weights, quantized, requant, names = dict(work.weights), work.quantized, work.requant, work.names
    for target, view in work.views:  # the file's own bytes, mapped (never cached); "name#e": expert e of a stack
        name, _, expert = view.partition("#")
        t = f.tensor(name, dtype=dt)
        weights[target] = t[int(expert)] if expert else t
    try:
        model = build_model(module, args, weights, dt, dev, f.path, quantized=quantized)
    except WeightError as e:  # name the tensor as the file does
        msg = str(e).split(f"tensor '{e.tensor}': ", 1)[-1]
        raise WeightError(names.get(e.tensor.removesuffix(".qweight"), e.tensor), msg, path=f.path) from None
    for scheme in ("int8", "int4"):
        todo = {k.removesuffix(".weight") for k, v in requant.items() if v == scheme}
        if todo:
            def skip(name: str, todo: set[str] = todo) -> bool:
                return name not in todo

            quantize_model(model, scheme, None, skip=skip)
    apply_quant(model, quant, group_size, tokenizer=tokenizer)  # int4-km calibrates with the tokenizer
    check_chat_template(tokenizer, "tokenizer.chat_template", f.path)
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError("tokenizer.ggml.tokens", f"lists {tokenizer.vocab_size} tokens but the embedding has "
                          f"{args.vocab_size} rows")
    gen_cfg = {"eos_token_id": cfg["eos_token_id"]} if cfg["eos_token_id"] else {}
    name = str(f.metadata.get("general.name") or Path(path).stem)
    return LoadedModel(model, args, tokenizer, dt, dev, name, gen_cfg, gguf=f, config=cfg)


def _load_work(f: GGUFFile, arch: str, module: Any, dt: torch.dtype, run_quantized: bool) -> gguf_cache.LoadWork:
    """The file's tensors for the model: quantized linears repacked (or marked for re-quantizing),
    others converted to dt (copies kept in weights, views of the mapped file listed in views).
    Stacked [E, out, in] experts (MoE: the module's gguf_expert_names) become one 2-D weight per
    expert; the module's GGUF_FLOAT_TENSORS are never taken as linears."""
    from ..quant.gguf_repack import repack

    work = gguf_cache.LoadWork()
    maps = FileMappings()
    tied = "output.weight" not in f.tensors
    expert_names = getattr(module, "gguf_expert_names", None)
    float_only = tuple(f".{n}.weight" for n in getattr(module, "GGUF_FLOAT_TENSORS", ()))
    for name in f.tensors:
        if name in _SKIP:
            continue
        info = f.tensors[name]
        experts = expert_names(name, info.shape[0]) if expert_names is not None and len(info.shape) == 3 else None
        if experts is not None:
            _load_experts(f, name, experts, work, dt, run_quantized, repack)
            continue
        target = hf_name(arch, name)
        if target is None:
            raise WeightError(name, f"is not a tensor of a GGUF {arch} model", path=f.path)
        work.names[target] = name
        if (run_quantized and info.ggml_type not in _FLOAT_TYPES and len(info.shape) == 2
                and not name.endswith(float_only)):
            # the embedding stays quantized too (a QuantEmbedding; tied: the output head's very buffers)
            linear = "lm_head.weight" if name == "token_embd.weight" and tied else target
            qw = repack(f.raw(name), info.ggml_type, info.shape)
            work.names.setdefault(linear, name)
            if qw is not None:
                work.quantized[linear] = work.quantized[target] = qw
                release_pages(f.raw(name), maps)  # repacked: the mapped file pages can go
                continue
            if linear != target or name != "token_embd.weight":
                work.requant[linear] = "int4" if info.ggml_type in _LOW_BIT_TYPES else "int8"
            # not repackable: the embedding (also the tied output's source) is dequantized below
        t = f.tensor(name, dtype=dt)
        raw = f.raw(name)
        if t.data_ptr() != raw.data_ptr():  # a converted copy: the mapped file pages can go
            work.weights[target] = t
            release_pages(raw, maps)
        else:
            work.views.append((target, name))
    return work


def _load_experts(f: GGUFFile, name: str, experts: list[str], work: gguf_cache.LoadWork, dt: torch.dtype,
                  run_quantized: bool, repack: Any) -> None:
    """One stacked expert tensor: float files as views per expert (mapped, uncopied), quantized
    ones repacked per expert (each expert's blocks are contiguous) or marked for re-quantizing."""
    info = f.tensors[name]
    if not run_quantized or info.ggml_type in _FLOAT_TYPES:
        full = f.tensor(name, dtype=dt)
        mapped = full.data_ptr() == f.raw(name).data_ptr()
        for e, target in enumerate(experts):
            work.names[target] = name
            if mapped:  # the file's own bytes: a view per expert, listed (never cached)
                work.views.append((target, f"{name}#{e}"))
            else:  # converted: the copy's slices (one storage, cached once)
                work.weights[target] = full[e]
        return
    slabs = f.raw(name).view(len(experts), -1)
    for e, target in enumerate(experts):
        work.names[target] = name
        qw = repack(slabs[e], info.ggml_type, (info.shape[1], info.shape[2]))
        if qw is not None:
            work.quantized[target] = qw
        else:
            work.requant[target] = "int4" if info.ggml_type in _LOW_BIT_TYPES else "int8"
            work.weights[target] = dequantize(slabs[e], info.ggml_type, info.shape[1:], dt)
