"""Rotary position embeddings: plain RoPE and Phi-3 LongRoPE ("longrope" == "su").

cos/sin are computed in float32 from float32 positions x inv_freq, multiplied by the attention
scaling (LongRoPE's mscale, in BOTH the short and the long regime) and only then cast to the
activation dtype -- the order transformers uses, which parity depends on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..kernels import fused
from .base import require_float, short_repr


@dataclass
class Rope:
    rotary_dim: int  # leading dims of each head that rotate (partial rotary keeps the rest)
    inv_freq: torch.Tensor  # [rotary_dim/2] float32, the short (or only) set
    inv_freq_long: torch.Tensor | None = None  # LongRoPE long set, used past original_max
    original_max: int | None = None
    scale: float = 1.0  # multiplies cos and sin
    long_scale: float | None = None  # the long regime's own factor (Phi-3.5-MoE's long_mscale); None: `scale`

    @property
    def crossover(self) -> int | None:
        """The length past which a pass uses the other frequency set (LongRoPE: original_max, as
        transformers' Phi3 switches on seq_len > original_max_position_embeddings); None: never."""
        return self.original_max if self.inv_freq_long is not None else None

    def regime(self, total_len: int) -> str:
        """Which frequency set a forward pass over `total_len` tokens uses."""
        crossover = self.crossover
        if crossover is None:
            return "default"
        return "long" if total_len > crossover else "short"

    def cos_sin(self, positions: torch.Tensor, regime: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [..., S] int -> cos, sin: [..., S, rotary_dim] (a leading row dim: one position set per row)
        inv = self.inv_freq_long if regime == "long" else self.inv_freq
        assert inv is not None, "regime() answers 'long' only where there is a long set"
        scale = self.long_scale if regime == "long" and self.long_scale is not None else self.scale
        freqs = positions.to(torch.float32)[..., None] * inv.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


    def cos_sin_rows(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at their own lengths (positions [B, S]): each row gets the frequency set of its own
        total length (LongRoPE: long past original_max, as a one-row pass over that row would)."""
        crossover = self.crossover
        if crossover is None:
            return self.cos_sin(positions, "default", dtype)
        cs, ss = self.cos_sin(positions, "short", dtype)
        cl, sl = self.cos_sin(positions, "long", dtype)
        long = (positions[:, -1] + 1 > crossover)[:, None, None]
        return torch.where(long, cl, cs), torch.where(long, sl, ss)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, D]; cos, sin: [S, rd] or [B or 1, S, rd] with rd <= D (partial rotary leaves x[..., rd:])
    out = fused.rope(x, cos, sin)  # the kernel's, where it runs: the same bits as the ops below
    if out is not None:
        return out
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def _factor_list(name: str, value: Any, n: int) -> torch.Tensor:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"rope_scaling.{name}", "must be a list of positive numbers")
    if len(value) != n:
        raise ConfigError(f"rope_scaling.{name}", f"must have rotary_dim/2 = {n} entries, got {len(value)}")
    return torch.tensor([require_float(f"rope_scaling.{name}[{i}]", f) for i, f in enumerate(value)],
                        dtype=torch.float32)


def build_rope(
    *,
    head_dim: int,
    theta: float,
    partial_rotary_factor: float,
    scaling: Mapping[str, Any] | None,
    max_position_embeddings: int,
    original_max_position_embeddings: int | None,
) -> Rope:
    """Rope from config values; `scaling` is config.json's rope_scaling (or rope_parameters)."""
    rotary_dim = int(head_dim * partial_rotary_factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ConfigError("partial_rotary_factor", f"gives an invalid rotary dim {rotary_dim} for head_dim {head_dim}")
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base = theta**exponent
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return Rope(rotary_dim, 1.0 / base)
    if kind == "linear":  # position interpolation (Gemma 3 4B+ global layers): positions / factor
        factor = require_float("rope_scaling.factor", (scaling or {}).get("factor"))
        return Rope(rotary_dim, 1.0 / base / factor)
    if kind not in ("longrope", "su", "yarn"):  # transformers maps legacy su/yarn to longrope for Phi-3
        raise ConfigError("rope_scaling.type", f"unsupported rope scaling {kind!r} (supported: linear, longrope, su)")
    assert scaling is not None
    n = rotary_dim // 2
    short = _factor_list("short_factor", scaling.get("short_factor"), n)
    long = _factor_list("long_factor", scaling.get("long_factor"), n)
    orig = original_max_position_embeddings or scaling.get("original_max_position_embeddings")
    if isinstance(orig, bool) or not isinstance(orig, int) or orig < 2:  # its log divides the attention factor
        raise ConfigError("original_max_position_embeddings", f"is required for LongRoPE, an integer >= 2; "
                          f"got {short_repr(orig)}")
    for key in ("attention_factor", "factor", "short_mscale", "long_mscale"):
        if scaling.get(key) is not None:
            require_float(f"rope_scaling.{key}", scaling[key])
    if scaling.get("short_mscale") is not None or scaling.get("long_mscale") is not None:
        # Phi-3.5-MoE states its own factors per regime (sqrt(1 + ln 64 / ln 2048), not the formula
        # below with its 131072/4096): taken as written, never recomputed
        short_m, long_m = scaling.get("short_mscale"), scaling.get("long_mscale")
        if short_m is None or long_m is None:
            raise ConfigError("rope_scaling.short_mscale", "short_mscale and long_mscale come together")
        return Rope(rotary_dim, 1.0 / (short * base), 1.0 / (long * base), orig, float(short_m), float(long_m))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        factor = scaling.get("factor") or max_position_embeddings / orig
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return Rope(rotary_dim, 1.0 / (short * base), 1.0 / (long * base), orig, float(attention_factor))
