"""Tiny HF folders written as GGUF files the way llama.cpp's converter writes them.

Same metadata keys and tensor names as convert_hf_to_gguf.py for phi3 and gemma3 (fused
attn_qkv / ffn_up for phi3, LongRoPE factors as tensors plus attn_factor; Gemma norms stored as
1 + w), tokenizer metadata from the folder's tokenizer.json. 2-D weights in the chosen ggml type.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.helpers.gguf_files import has_reference_quantizer, random_blocks, write_gguf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_metadata(folder: Path, *, name: str, add_bos: bool = True, add_space_prefix: bool | None = None,
                       vocab_size: int | None = None) -> dict:
    """GGUF tokenizer metadata for a Llama-SPM tokenizer.json: score = -merge rank of a piece; specials
    control, <unk> unknown, <|placeholder5|> user-defined; rows up to vocab_size padded as unused."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens: list[str | None] = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    assert None not in tokens
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    rank = {a + b: r for r, (a, b) in enumerate(merges)}
    added = {t["content"] for t in data["added_tokens"]}
    scores, types = [], []
    for i, t in enumerate(tokens):
        if t == "<unk>":
            kind, score = UNKNOWN, 0.0
        elif t == "<|placeholder5|>":
            kind, score = USER_DEFINED, 0.0
        elif t in added:
            kind, score = CONTROL, 0.0
        elif t.startswith("<0x") and len(t) == 6:
            kind, score = BYTE, 0.0
        else:
            kind, score = NORMAL, -float(rank.get(t, len(merges) + i))
        types.append(kind)
        scores.append(score)
    for i in range(len(tokens), vocab_size or len(tokens)):  # padded embedding rows, as in Phi-3's 32064
        tokens.append(f"<dummy{i}>")
        scores.append(0.0)
        types.append(UNUSED)
    meta = {"general.name": name, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": vocab["<|endoftext|>"],
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
            "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": False}
    if add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    tc = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if tc:
        meta["tokenizer.chat_template"] = tc
    return meta


def _weights(folder: Path):
    """(name, tensor) one at a time from the folder's safetensors (a 3.8B model must not sit in float32)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


_PHI3 = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GEMMA3 = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}
_PHIMOE = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "block_sparse_moe.gate": "ffn_gate_inp"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "model.norm.bias": "output_norm.bias", "lm_head.weight": "output.weight", "lm_head.bias": "output.bias"}


def gguf_name(hf: str, table: dict[str, str]) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{table['.'.join(parts[3:-1])]}.{parts[-1]}"


def _bpe_style(folder: Path) -> str | None:
    """"o200k" / "cl100k" for a tiny_bpe folder (told apart by its tags), None for a SentencePiece one."""
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    if tc.get("tokenizer_class") != "GPT2Tokenizer":
        return None
    return "cl100k" if "<|im_start|>" in tc["chat_template"] else "o200k"


def hf_to_gguf(folder: Path, out: Path, qtype: str = "F32", expert_qtype: str | None = None,
               router_qtype: str = "F32") -> Path:
    """Convert a tiny phi3 / phimoe / gemma3_text HF folder to GGUF; 2-D weights stored as `qtype`
    (phimoe's stacked experts as `expert_qtype`, default the same; its router stays F32, as
    llama.cpp's converter keeps ffn_gate_inp)."""
    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg["model_type"]
    W = _weights(folder)
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    if mt == "phi3":
        a, table = "phi3", _PHI3
        H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        hd = H // nh
        meta = {f"{a}.context_length": cfg["max_position_embeddings"], f"{a}.embedding_length": H,
                f"{a}.feed_forward_length": cfg["intermediate_size"], f"{a}.block_count": cfg["num_hidden_layers"],
                f"{a}.attention.head_count": nh, f"{a}.attention.head_count_kv": cfg["num_key_value_heads"],
                f"{a}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
                f"{a}.rope.dimension_count": int(cfg.get("partial_rotary_factor", 1.0) * hd),
                f"{a}.rope.freq_base": (cfg.get("rope_parameters") or {}).get("rope_theta")
                or cfg.get("rope_theta", 10000.0),  # transformers 5 writes theta inside rope_parameters
                f"{a}.rope.scaling.original_context_length": cfg.get("original_max_position_embeddings")
                or cfg["max_position_embeddings"]}
        if cfg.get("sliding_window"):
            meta[f"{a}.attention.sliding_window"] = cfg["sliding_window"]
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rs and rs.get("long_factor"):
            orig = cfg["original_max_position_embeddings"]
            scale = cfg["max_position_embeddings"] / orig
            meta[f"{a}.rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(orig))
            tensors["rope_factors_long.weight"] = (np.array(rs["long_factor"], np.float32), "F32")
            tensors["rope_factors_short.weight"] = (np.array(rs["short_factor"], np.float32), "F32")
    elif mt == "phimoe":  # convert_hf_to_gguf's PhiMoeModel: Phi3 keys + experts stacked per layer
        a, table = "phimoe", _PHIMOE
        H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        meta = {f"{a}.context_length": cfg["max_position_embeddings"], f"{a}.embedding_length": H,
                f"{a}.feed_forward_length": cfg["intermediate_size"], f"{a}.block_count": cfg["num_hidden_layers"],
                f"{a}.attention.head_count": nh, f"{a}.attention.head_count_kv": cfg["num_key_value_heads"],
                f"{a}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
                f"{a}.rope.dimension_count": H // nh, f"{a}.rope.freq_base": rs.get("rope_theta", 10000.0),
                f"{a}.expert_count": cfg["num_local_experts"], f"{a}.expert_used_count": cfg["num_experts_per_tok"]}
        if rs.get("long_factor"):
            orig = rs["original_max_position_embeddings"]
            scale = cfg["max_position_embeddings"] / orig
            meta[f"{a}.rope.scaling.original_context_length"] = orig
            # the converter computes this itself and does not read short_mscale / long_mscale
            meta[f"{a}.rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(orig))
            tensors["rope_factors_long.weight"] = (np.array(rs["long_factor"], np.float32), "F32")
            tensors["rope_factors_short.weight"] = (np.array(rs["short_factor"], np.float32), "F32")
    elif mt == "gemma3_text":
        a, table = "gemma3", _GEMMA3
        meta = {f"{a}.context_length": cfg["max_position_embeddings"], f"{a}.embedding_length": cfg["hidden_size"],
                f"{a}.feed_forward_length": cfg["intermediate_size"], f"{a}.block_count": cfg["num_hidden_layers"],
                f"{a}.attention.head_count": cfg["num_attention_heads"],
                f"{a}.attention.head_count_kv": cfg["num_key_value_heads"],
                f"{a}.attention.key_length": cfg["head_dim"], f"{a}.attention.value_length": cfg["head_dim"],
                f"{a}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
                f"{a}.rope.freq_base": 1_000_000.0, f"{a}.attention.sliding_window": cfg["sliding_window"]}
    else:
        raise ValueError(mt)
    style = _bpe_style(folder)
    if style is not None:  # Phi-4 family: byte-level BPE
        from tests.helpers.tiny_bpe import bpe_gguf_metadata

        meta.update(bpe_gguf_metadata(folder, style=style, vocab_size=cfg["vocab_size"]), **{"general.name": "tiny"})
    else:
        meta.update(tokenizer_metadata(folder, name=f"tiny {mt}", vocab_size=cfg["vocab_size"],
                                       add_bos=mt != "phi3"))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in W:
        if ".block_sparse_moe.experts." in name:  # model.layers.N.block_sparse_moe.experts.E.wK.weight
            parts = name.split(".")
            half = (expert_qtype or qtype) == "F16"  # a real-size F16 conversion must not sit in float32
            experts.setdefault((parts[2], parts[6]), {})[int(parts[5])] = (t.half() if half else t.float()).numpy()
            continue
        if name == "lm_head.weight" and (mt == "gemma3_text" or cfg.get("tie_word_embeddings")):
            continue  # tied to the embedding: the converter writes no output.weight
        t = t.float()
        if mt == "gemma3_text" and name.endswith("norm.weight"):
            t = t + 1  # the converter stores 1 + w
        if t.dim() == 2 and qtype == "F16":
            t = t.half()  # halve the memory of big conversions before write_gguf sees them
        gname = gguf_name(name, table)
        tensors[gname] = (t.numpy(), (router_qtype if "gate_inp" in gname else qtype) if t.dim() == 2 else "F32")
    rng = np.random.default_rng(0)
    for layer, w in list(experts):  # [E, out, in], ggml's ne = (in, out, E); each layer's copies freed as stacked
        per = experts.pop((layer, w))
        kind = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}[w]
        stacked, et = np.stack([per[e] for e in sorted(per)]), expert_qtype or qtype
        if not has_reference_quantizer(et):  # K-quants (gguf-py cannot write them): valid random blocks
            stacked = random_blocks(et, stacked.shape, rng)
        tensors[f"blk.{layer}.{kind}.weight"] = (stacked, et)
    return write_gguf(out, a, meta, tensors)


def dequantized_copy(src: Path, dst: Path, transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Path:
    """The GGUF file src with every tensor dequantized to F32 (same metadata), written to dst;
    transform(name, array) may change each tensor on the way (benchmarks/quality_fixtures.py)."""
    import gguf

    from slmkit.gguf import open_gguf

    reader = gguf.GGUFReader(str(src))
    arch = open_gguf(src).architecture
    w = gguf.GGUFWriter(str(dst), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    f = open_gguf(src)
    for name in f.tensors:
        a = f.tensor(name).numpy()
        w.add_tensor(name, a if transform is None else np.ascontiguousarray(transform(name, a)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
