"""Float weights for benchmarks/quality.py that no quantizer has seen before.

The built-in model exists only as a Q4_K_M GGUF, so its "float" weights are that file
dequantized: every block already lies on Q5_0 / Q8_0 / Q4_K / Q6_K's grid. llama.cpp re-quantizing
them to Q4_K_M picks the same types for the same tensors and lands back on (nearly) the same
codes, an advantage no other quantizer has. Two ways off the grid, the same for every
quantizer (only the first turns out fair):

- permuted: an exact, function-preserving relabelling of channels. The residual stream's channels
  (every input column of q/k/v/gate/up, output row of o/down, the norms, the embedding's columns),
  each MLP's intermediate channels (rows of gate/up, columns of down) and each layer's value
  dimensions (rows of v within a head, the matching columns of o) are permuted, so every group of
  32 inputs mixes weights from 32 different blocks of the original file while the model computes
  the same function (float perplexity equal up to summation order).
- dithered: each quantized weight of the file plus uniform noise within +-half of its block's
  quantization step (estimated from the block's values and type), a slightly worse model. Measured,
  it does not remove the bias: re-rounding to the same types pulls the weights back toward the
  original grid (and model), so only the permutation is fair.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

Transform = Callable[[str, np.ndarray], np.ndarray]

_RESIDUAL_IN = {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"}  # [out, hidden]: columns permuted
_NORMS = {"attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"}
_UNTOUCHED = {"attn_q_norm", "attn_k_norm"}  # per head dimension of q / k: rotary, left alone
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def permutation(meta: dict, seed: int = 0) -> Transform:
    """The function-preserving channel permutation (see the module doc) for a gemma3 / llama-style
    GGUF's metadata, as a transform of (tensor name, float array in torch order [out, in])."""
    arch = meta["general.architecture"]
    hidden, inter = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.feed_forward_length"])
    heads, kv = int(meta[f"{arch}.attention.head_count"]), int(meta.get(f"{arch}.attention.head_count_kv", 1))
    hd = int(meta.get(f"{arch}.attention.value_length", meta.get(f"{arch}.attention.key_length", hidden // heads)))
    layers = int(meta[f"{arch}.block_count"])
    rng = np.random.default_rng(seed)
    res = rng.permutation(hidden)
    mlp = [rng.permutation(inter) for _ in range(layers)]
    val = [rng.permutation(hd) for _ in range(layers)]

    def apply(name: str, a: np.ndarray) -> np.ndarray:
        if name in ("token_embd.weight", "output.weight"):
            return a[:, res]
        if name == "output_norm.weight":
            return a[res]
        m = _BLK.match(name)
        if m is None:
            raise ValueError(f"{name}: no exact permutation rule for this tensor")
        i, kind = int(m.group(1)), m.group(2)
        if kind in _UNTOUCHED:
            return a
        if kind in _NORMS:
            return a[res]
        if kind in _RESIDUAL_IN:
            a = a[:, res]
            if kind == "attn_v":  # [kv * hd, hidden]: the value dimensions of every kv head alike
                a = a.reshape(kv, hd, hidden)[:, val[i]].reshape(kv * hd, hidden)
            return a[mlp[i]] if kind in ("ffn_gate", "ffn_up") else a
        if kind == "attn_output":  # [hidden, heads * hd]: each head reads its kv head's values
            return a[res].reshape(hidden, heads, hd)[:, :, val[i]].reshape(hidden, heads * hd)
        if kind == "ffn_down":
            return a[res][:, mlp[i]]
        raise ValueError(f"{name}: no exact permutation rule for this tensor")

    return apply


# values per step of a block's grid, from its largest magnitude (symmetric types) or its range
_ABSMAX_STEPS = {"Q8_0": (32, 127), "Q5_0": (32, 16), "Q4_0": (32, 8), "Q6_K": (16, 32)}
_RANGE_STEPS = {"Q4_K": (32, 15), "Q5_K": (32, 31), "Q4_1": (32, 15), "Q5_1": (32, 31)}


def quant_step(a: np.ndarray, type_name: str) -> np.ndarray | None:
    """Per weight, the quantization step of its block in a dequantized tensor of type type_name
    (None for float types: nothing to dither)."""
    if type_name in _ABSMAX_STEPS:
        block, div = _ABSMAX_STEPS[type_name]
        g = a.reshape(-1, block)
        step = np.abs(g).max(axis=1, keepdims=True) / div
    elif type_name in _RANGE_STEPS:
        block, div = _RANGE_STEPS[type_name]
        g = a.reshape(-1, block)
        step = (g.max(axis=1, keepdims=True) - g.min(axis=1, keepdims=True)) / div
    else:
        return None
    return np.broadcast_to(step, g.shape).reshape(a.shape)


def dither(types: dict[str, str], seed: int = 0) -> Transform:
    """Uniform noise within +-half a step on every quantized tensor (types: name -> the shipped
    file's type name)."""
    rng = np.random.default_rng(seed)

    def apply(name: str, a: np.ndarray) -> np.ndarray:
        step = quant_step(a, types.get(name, "F32"))
        if step is None:
            return a
        return (a + (rng.random(a.shape, dtype=np.float32) - 0.5) * step).astype(a.dtype)

    return apply


def transformed_copy(src: Path, dst: Path, transform: Transform) -> Path:
    """src (a GGUF) dequantized to F32 with transform applied to every tensor, written to dst."""
    from tests.helpers.gguf_models import dequantized_copy

    return dequantized_copy(src, dst, transform=transform)
