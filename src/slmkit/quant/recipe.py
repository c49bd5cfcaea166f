"""Mixed-precision int4 recipes: `int4-mixed` and `int4-k` (two-level scales).

Measured on the built-in Gemma 3 270M's float weights (weights quantized, activations float,
256 tokens; the first notes of the h17 quant work, benchmarks/quality.py reruns it properly):
- Quantizing one kind of projection at a time to int4 g32 (the rest float) costs +7.0% perplexity
  for v_proj, +1.9% k_proj, +2-3% each of gate / up / down, ~0% q_proj / o_proj; all of them
  +17.3%. k_proj and v_proj are small (GQA: few KV heads), so both recipes keep them int8, as
  Q4_K_M keeps attn_v at Q8_0 / Q6_K: int4-mixed (the rest plain int4 g32) measured +7.0% at
  5.21 bits per linear weight (plain int4 g32: 5.0 bits, +17.3%).
- int4-k stores the rest as K-quants do: per group of 32 a scale and a min <= 0, searched over
  clip ratios and refit by (weighted: importance()) least squares, kept as uint8 codes times a float32 super-scale /
  super-min per (at most) 256 inputs, with the weights re-rounded against the stored scales: 4.75
  bits (4.9 where a row has 20 groups, as K = 640), which the compiled kernel runs as it runs Q4_K
  (scale kind 2). Measured +8.3% there at ~5.06 bits per linear weight (+11.0% with llama.cpp's
  RMS + |w| importance): fewer bits, a little more loss.
Neither reaches Q4_K_M's +1.17% on this model, which llama.cpp reaches at ~5.7 bits per linear
weight (K = 640 rows cannot hold Q4_K blocks: they fall back to Q5_0; attn_v Q8_0, ffn_down Q6_K).
"""
from __future__ import annotations

import torch
from torch import nn

from .format import TILE, QuantWeight, _tile_groups, from_codes, padded

MIXED = "int4-mixed"    # k/v int8, the rest plain int4 (fp16 scale and min per group)
TWO_LEVEL = "int4-k"    # k/v int8, the rest with two-level scales (quantize_mixed)
INT8_SUFFIXES = ("k_proj", "v_proj")  # the sensitive small projections (see above); lm_head too
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def keeps_int8(name: str) -> bool:
    return name == "lm_head" or name.rsplit(".", 1)[-1] in INT8_SUFFIXES


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


def importance(w: torch.Tensor) -> torch.Tensor:
    """How much each weight's rounding error counts in the fit: uniform. (llama.cpp's rule without
    an imatrix, the row's RMS + |w|, measured worse here: +11.0% against +8.3%; a calibration-based
    importance would go here.)"""
    return torch.ones_like(w)


def _two_level(x: torch.Tensor, ps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x >= 0 [rows, groups] -> uint8 codes [rows, groups] and float32 supers [rows, groups // ps]
    with x ~ code * super (super = the block's max / 255)."""
    rows, ng = x.shape
    sup = x.view(rows, ng // ps, ps).amax(-1) / 255
    inv = torch.where(sup > 0, 1.0 / sup, torch.zeros_like(sup)).repeat_interleave(ps, dim=1)
    return torch.round(x * inv).clamp_(0, 255).to(torch.uint8), sup


def quantize_mixed(w: torch.Tensor, group: int = 32, *, rows_per_chunk: int = 256) -> QuantWeight:
    """Asymmetric int4 with two-level (uint8 x float32) scales and mins of a float [n, k] weight."""
    n, k = w.shape
    ng = padded(k, group) // group
    ps = per_super(ng, group)
    u = torch.empty(n, ng * group, dtype=torch.uint8)
    sc = torch.empty(n, ng, dtype=torch.uint8)
    mc = torch.empty(n, ng, dtype=torch.uint8)
    ss = torch.empty(n, ng // ps, dtype=torch.float32)
    sm = torch.empty(n, ng // ps, dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        chunk = w[r0:r1].float()
        imp = importance(chunk)
        if k % group:  # pad the last group with zeros of zero importance: the fit ignores them
            chunk = torch.nn.functional.pad(chunk, (0, ng * group - k))
            imp = torch.nn.functional.pad(imp, (0, ng * group - k))
        g = chunk.view(r1 - r0, ng, group)
        s, m = _search(g, imp.view_as(g))
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
    qw.super_scales, qw.super_mins = _tile_groups(sup_s), _tile_groups(sup_m)
    return qw


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
