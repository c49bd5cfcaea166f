"""Mixed-precision int4 recipes: `int4-mixed`, `int4-k` (two-level scales) and `int4-km`.

Measured on the built-in Gemma 3 270M's float weights (weights quantized, activations float,
256 tokens; the first notes of the h17 quant work, benchmarks/quality.py reruns it properly):
- Quantizing one kind of projection at a time to int4 g32 (the rest float) costs +7.0% perplexity
  for v_proj, +1.9% k_proj, +2-3% each of gate / up / down, ~0% q_proj / o_proj; all of them
  +17.3%. k_proj and v_proj are small (GQA: few KV heads), so the recipes keep them int8, as
  Q4_K_M keeps attn_v at Q8_0 / Q6_K: int4-mixed (the rest plain int4 g32) measured +7.0% at
  5.21 bits per linear weight (plain int4 g32: 5.0 bits, +17.3%).
- int4-k stores the rest as K-quants do: per group of 32 a scale and a min <= 0, searched over
  clip ratios and refit by (weighted) least squares, kept as uint8 codes times a float32 super-scale /
  super-min per (at most) 256 inputs, with the weights re-rounded against the stored scales: 4.75
  bits (4.9 where a row has 20 groups, as K = 640), which the compiled kernel runs as it runs Q4_K
  (scale kind 2). Measured +8.3% there at ~5.06 bits per linear weight (+11.0% with llama.cpp's
  RMS + |w| importance): fewer bits, a little more loss.
- int4-km spends bits where Q4_K_M does and fits to the inputs: v_proj and, in Q4_K_M's "more
  bits" layers (the first and last eighth, every third between: llama.cpp's use_more_bits),
  down_proj at int8, the rest int4-k (k_proj too); given a tokenizer, one float forward pass over
  the calibration text shipped in the package (calibrate.py) measures E[x_j**2] of every linear's
  inputs: the linears fed by a norm are first rescaled per input channel with the inverse folded
  into the norm (equalize.py, exact in float), and every fit weights each weight's error by its
  input's power. On the fair (permuted) fixture of benchmarks/quality.py, mean over three
  permutations: +6.1% perplexity (+2.6% to +8.1%) at 5.39 bits per linear weight, where
  llama.cpp's Q4_K_M of the same weights gives +7.1% (+4.9% to +8.7%) at 5.43: on par, not
  clearly better (which weights share a group moves every result by several points). K = 640
  rows cannot hold Q4_K blocks, so Q4_K_M falls back to Q5_0 there; attn_v Q8_0 / Q5_0, ffn_down
  Q6_K / Q4_K. On seed 0 (+2.6% vs +7.7%), without the equalization +5.8%, without any
  calibration +9.6% (k_proj int8 there, 5.50 bits).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from .format import TILE, QuantWeight, _tile_groups, from_codes, padded

MIXED = "int4-mixed"    # k/v int8, the rest plain int4 (fp16 scale and min per group)
TWO_LEVEL = "int4-k"    # k/v int8, the rest with two-level scales (quantize_mixed)
KM = "int4-km"          # v and some down_proj int8 (as Q4_K_M), the rest int4-k fitted to calibration
INT8_SUFFIXES = ("k_proj", "v_proj")  # the sensitive small projections (see above); lm_head too
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def keeps_int8(name: str) -> bool:
    return name == "lm_head" or name.rsplit(".", 1)[-1] in INT8_SUFFIXES


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers where Q4_K_M stores ffn_down (and attn_v) at Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def km_int8_names(names: list[str]) -> set[str]:
    """The linears int4-km keeps at int8, the ones Q4_K_M gives more bits: lm_head, v_proj (attn_v),
    and down_proj in the more-bits layers (the layer count taken from the names: the largest
    `layers.N.` index + 1). k_proj stays int4: equalized and fitted it costs little, and without it
    the recipe fits in Q4_K_M's bits on the built-in model (5.39 against 5.43; with it 5.50)."""
    index = {name: int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    layers = max(index.values(), default=-1) + 1
    suffix = {name: name.rsplit(".", 1)[-1] for name in names}
    return {name for name in names if name == "lm_head" or suffix[name] == "v_proj" or (
        suffix[name] == "down_proj" and name in index and more_bits(index[name], layers))}


def per_super(groups: int, group: int) -> int:
    """Groups per super-scale: the largest divisor of the row's group count spanning <= 256 inputs."""
    return max(d for d in range(1, max(1, 256 // group) + 1) if groups % d == 0)


def _wfit(g: torch.Tensor, imp: torch.Tensor, u: torch.Tensor, s0: torch.Tensor,
          m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and min minimising sum imp * (s * u + m - g)^2 for fixed codes u."""
    sw, su, sg = imp.sum(-1), (imp * u).sum(-1), (imp * g).sum(-1)
    suu, sug = (imp * u * u).sum(-1), (imp * u * g).sum(-1)
    det = sw * suu - su * su
    ok = det > 1e-20 * sw * suu
    s = torch.where(ok, (sw * sug - su * sg) / torch.where(ok, det, 1), s0)
    m = torch.where(ok, (sg - s * su) / sw.clamp_min(1e-30), m0)
    return s, m


def _search(g: torch.Tensor, imp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim) a scale > 0 and a min <= 0 with the smallest weighted squared error."""
    lo0, hi0 = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
    best_e = best_s = best_m = None
    for clip in CLIPS:
        lo, hi = lo0 * clip, hi0 * clip
        s = ((hi - lo) / 15).clamp_min(1e-12)
        u = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, 15)
        s, m = _wfit(g, imp, u, s, lo)
        s, m = s.clamp_min(1e-12), m.clamp_max(0)
        u = torch.round((g - m[..., None]) / s[..., None]).clamp_(0, 15)
        e = (imp * (u * s[..., None] + m[..., None] - g).square()).sum(-1)
        if best_e is None or best_s is None or best_m is None:
            best_e, best_s, best_m = e, s, m
        else:
            better = e < best_e
            best_e, best_s, best_m = (torch.where(better, e, best_e), torch.where(better, s, best_s),
                                      torch.where(better, m, best_m))
    assert best_s is not None and best_m is not None
    return best_s, best_m


def _two_level(x: torch.Tensor, ps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x >= 0 [rows, groups] -> uint8 codes [rows, groups] and float32 supers [rows, groups // ps]
    with x ~ code * super (super = the block's max / 255)."""
    rows, ng = x.shape
    sup = x.view(rows, ng // ps, ps).amax(-1) / 255
    inv = torch.where(sup > 0, 1.0 / sup, torch.zeros_like(sup)).repeat_interleave(ps, dim=1)
    return torch.round(x * inv).clamp_(0, 255).to(torch.uint8), sup


def quantize_mixed(w: torch.Tensor, group: int = 32, *, weights: torch.Tensor | None = None,
                   rows_per_chunk: int = 256) -> QuantWeight:
    """Asymmetric int4 with two-level (uint8 x float32) scales and mins of a float [n, k] weight.
    weights: how much each input's rounding error counts in the fit of scales and mins, [k] > 0
    (calibrate.importance), or None: uniform. (llama.cpp's rule without an imatrix, the row's
    RMS + |w|, measured worse than uniform on Gemma 3 270M: +11.0% against +8.3%.)"""
    n, k = w.shape
    if weights is not None and tuple(weights.shape) != (k,):
        raise ValueError(f"importance weights of shape {tuple(weights.shape)} for a weight of {k} inputs")
    ng = padded(k, group) // group
    imp = torch.ones(k) if weights is None else weights.float()
    # pad the last group with zeros of zero importance: the fit ignores them
    imp = torch.nn.functional.pad(imp, (0, ng * group - k)).view(1, ng, group)
    ps = per_super(ng, group)
    u = torch.empty(n, ng * group, dtype=torch.uint8)
    sc = torch.empty(n, ng, dtype=torch.uint8)
    mc = torch.empty(n, ng, dtype=torch.uint8)
    ss = torch.empty(n, ng // ps, dtype=torch.float32)
    sm = torch.empty(n, ng // ps, dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        chunk = w[r0:r1].float()
        if k % group:
            chunk = torch.nn.functional.pad(chunk, (0, ng * group - k))
        g = chunk.view(r1 - r0, ng, group)
        s, m = _search(g, imp)
        sc[r0:r1], ss[r0:r1] = _two_level(s, ps)
        mc[r0:r1], sm[r0:r1] = _two_level(-m, ps)
        # re-round every weight against the scales and mins as stored (float32 products, as the kernel)
        sq = sc[r0:r1].float() * ss[r0:r1].repeat_interleave(ps, dim=1)
        mq = mc[r0:r1].float() * (-sm[r0:r1]).repeat_interleave(ps, dim=1)
        inv = torch.where(sq > 0, 1.0 / sq, torch.zeros_like(sq))
        u[r0:r1] = torch.round((g - mq[..., None]) * inv[..., None]).clamp_(0, 15).view(r1 - r0, -1).to(torch.uint8)
    qw = from_codes(u[:, :k], sc, mc, bits=4, group=group, zero=0, n=n, k=k)
    np_ = padded(n, TILE)
    sup_s = torch.zeros(np_, ng // ps, dtype=torch.float32)
    sup_m = torch.zeros(np_, ng // ps, dtype=torch.float32)
    sup_s[:n], sup_m[:n] = ss, -sm
    return replace(qw, super_scales=_tile_groups(sup_s), super_mins=_tile_groups(sup_m))  # pairs them


def bits_per_weight(model: nn.Module, *, include_lm_head: bool = False) -> float:
    """Stored bits (codes, scales, mins, super-scales) per weight over the model's quantized
    linears (the output head left out unless asked: it is most of a small model's bytes)."""
    from .linear import QuantLinear

    bits = weights = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and (include_lm_head or name != "lm_head"):
            bits += mod.weight_q.nbytes * 8
            weights += mod.in_features * mod.out_features
    return bits / weights if weights else 0.0
