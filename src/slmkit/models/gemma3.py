"""Gemma 3 text decoder (HF `Gemma3ForCausalLM`, model_type "gemma3_text"; GGUF arch "gemma3").

The built-in demo model (Gemma 3 270M) runs on this. Differences from Phi-3: embeddings scaled
by sqrt(hidden), separate q/k/v with RMSNorm on q and k per head, pre- and post-norms around
attention and MLP, GeGLU (tanh GELU), attention scale query_pre_attn_scalar**-0.5, interleaved
sliding-window (local, rope base 10k) and global (rope base 1M) layers, tied embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import fused
from .base import MAX_POSITIONS, BaseArgs, gguf_value, require_float, require_int
from .cache import KVCache, Step
from .layers import ACTIVATIONS, RMSNorm, attention
from .rope import Rope, apply_rope, build_rope

if TYPE_CHECKING:
    from ..gguf import GGUFFile

LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_BLOCK = 256  # positions per rotary table the fused decode step reads (Model._rope_rows)
NORMS_IN_FLOAT32 = True  # Gemma norms multiply in float32: keep (1 + w) exact, as llama.cpp does


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    model_type: str = "gemma3_text"
    num_key_value_heads: int = 1
    head_dim: int = 256
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6
    layer_types: list | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5: {"full_attention": {...}, "sliding_attention": {...}}
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    norm_offset: float = 1.0  # 1 for HF weights (stored as w - 1); 0 for GGUF (converter added the 1)
    bos_token_id: Any = 2
    eos_token_id: Any = 1
    pad_token_id: Any = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                     "num_key_value_heads", "head_dim"):
            require_int(name, getattr(self, name))
        require_int("max_position_embeddings", self.max_position_embeddings, maximum=MAX_POSITIONS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        require_float("rms_norm_eps", self.rms_norm_eps)
        require_float("query_pre_attn_scalar", self.query_pre_attn_scalar)
        if not isinstance(self.hidden_activation, str) or self.hidden_activation not in ACTIVATIONS:
            raise ConfigError("hidden_activation", f"unsupported activation {self.hidden_activation!r}")
        if self.attn_logit_softcapping is not None:
            raise ConfigError("attn_logit_softcapping", "attention logit soft-capping (Gemma 2) is not supported")
        if self.layer_types is None:
            require_int("sliding_window_pattern", self.sliding_window_pattern)
            self.layer_types = ["sliding_attention" if (i + 1) % self.sliding_window_pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers
                or any(t not in LAYER_TYPES for t in self.layer_types)):
            raise ConfigError("layer_types", f"must list {self.num_hidden_layers} of {LAYER_TYPES}")
        if self.sliding_window is not None:
            require_int("sliding_window", self.sliding_window)
        if self.final_logit_softcapping is not None:
            require_float("final_logit_softcapping", self.final_logit_softcapping)
        params = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        for key in ("full_attention", "sliding_attention"):
            if not isinstance(params.get(key) or {}, dict):
                raise ConfigError(f"rope_parameters.{key}", "must be an object")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError("rope_scaling", "must be an object or null")
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if self.rope_scaling:
            full.update(self.rope_scaling)
        full.setdefault("rope_theta", self.rope_theta)
        local.setdefault("rope_theta", self.rope_local_base_freq)

        def rope(theta: float, scaling: dict) -> Rope:
            return build_rope(head_dim=self.head_dim, theta=theta, partial_rotary_factor=1.0, scaling=scaling,
                              max_position_embeddings=self.max_position_embeddings,
                              original_max_position_embeddings=None)

        self.rope_global = rope(require_float("rope_theta", full["rope_theta"]), full)
        self.rope_local = rope(require_float("rope_local_base_freq", local["rope_theta"]), local)


class GemmaNorm(RMSNorm):
    """Gemma's RMSNorm: times (offset + weight) in float32 (offset 1 for HF weights, 0 for GGUF).
    Through the compiled kernel where it runs (kernels/fused.py: the fused decode step's own norm,
    so both paths give the same bits), else torch's ops (RMSNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.rms_norm(x, self.weight, self.eps, self.offset)
        return super().forward(x) if y is None else y

    def add(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h + self(x) (the residual add after a block), in one kernel call where it runs."""
        y = fused.rms_norm(x, self.weight, self.eps, self.offset, residual=h)
        return h + super().forward(x) if y is None else y


def _norm(dim: int, args: ModelArgs) -> GemmaNorm:
    return GemmaNorm(dim, args.rms_norm_eps, offset=args.norm_offset, fp32_weight=True)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, layer: int):
        super().__init__()
        self.layer = layer  # its index in the cache
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        H = args.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        self.q_norm = _norm(self.head_dim, args)
        self.k_norm = _norm(self.head_dim, args)
        self.sliding = layer_type == "sliding_attention"
        self.window = args.sliding_window if self.sliding else None
        self.scale = args.query_pre_attn_scalar**-0.5

    def forward(self, x: torch.Tensor, rope: dict, step: Step) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D]
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope["local" if self.sliding else "global"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        out = attention(q, k, v, step.span, window=self.window, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_activation]
        self.tanh_gelu = args.hidden_activation in ("gelu_pytorch_tanh", "gelu_new")  # the kernel's GeGLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        y = fused.geglu(gate, up) if self.tanh_gelu else None
        return self.down_proj(self.act(gate) * up if y is None else y)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, layer: int):
        super().__init__()
        H = args.hidden_size
        self.input_layernorm = _norm(H, args)
        self.self_attn = Attention(args, layer_type, layer)
        self.post_attention_layernorm = _norm(H, args)
        self.pre_feedforward_layernorm = _norm(H, args)
        self.mlp = MLP(args)
        self.post_feedforward_layernorm = _norm(H, args)

    def forward(self, h: torch.Tensor, rope: dict, step: Step) -> torch.Tensor:
        h = self.post_attention_layernorm.add(h, self.self_attn(self.input_layernorm(h), rope, step))
        return self.post_feedforward_layernorm.add(h, self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        assert args.layer_types is not None  # ModelArgs.__post_init__ fills it
        self.layers = nn.ModuleList(DecoderLayer(args, t, i) for i, t in enumerate(args.layer_types))
        self.norm = _norm(args.hidden_size, args)


class Model(nn.Module):
    """Gemma3ForCausalLM. forward(input_ids [B, S], cache) -> logits [B, S or 1, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Gemma3Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._plan = fused.PlanCache()  # the fused decode step's (_decode_fused)
        self._rope_block: tuple[torch.dtype, int, list[torch.Tensor]] | None = None  # its rotary rows (_rope_rows)

    @property
    def rope(self) -> Rope:
        return self.args.rope_global

    def _apply(self, *args: Any, **kwargs: Any) -> Model:
        self._plan.clear()  # .to() and the like move the weights the fused step points into
        return super()._apply(*args, **kwargs)

    def _rope_rows(self, pos: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """cos, sin (global), cos, sin (local) at positions pos..pos + n - 1, [n, head_dim] each: rows
        of tables computed ROPE_BLOCK positions at a time by the same cos_sin (each row the bits a
        one-position call gives)."""
        blk = self._rope_block
        if blk is None or blk[0] != dtype or not (blk[1] <= pos and pos + n <= blk[1] + len(blk[2][0])):
            positions = torch.arange(pos, pos + max(ROPE_BLOCK, n))[None]
            tabs = [t[0] for r in (self.args.rope_global, self.args.rope_local)
                    for t in r.cos_sin(positions, "default", dtype)]
            blk = self._rope_block = (dtype, pos, tabs)
        return [t[pos - blk[1]:pos - blk[1] + n] for t in blk[2]]

    def _decode_fused(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """A few new tokens of one row (a decode step's one; a verification's pending token and
        drafts) through every layer and the final norm in one kernel call (kernels/fused.cpp): the
        normed hidden states (h itself is updated in place); None where it cannot run (then the
        layers run one op at a time, with the same bits)."""
        lib = fused.step_lib(h)
        plan = None if lib is None else self._plan.get(
            self, lib, lambda: fused.gemma3_plan(list(self.model.layers), self.model.norm, self.args))
        if plan is None:
            return None
        S = h.shape[1]
        return fused.gemma3_decode(plan, h, cache.k, cache.v, cache.offset, self._rope_rows(cache.offset, S, h.dtype))

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """hidden: return the final-normed hidden states [B, S, hidden] (what lm_head reads) instead of logits."""
        S = input_ids.shape[1]
        h = self.model.embed_tokens(input_ids)
        h = h * torch.tensor(self.args.hidden_size**0.5, dtype=h.dtype)  # rounded to the dtype, as HF does
        normed = self._decode_fused(h, cache) if S <= fused.MAX_FUSED_TOKENS and type(cache) is KVCache else None
        if normed is None:
            step = Step.of(cache, S, input_ids.device)
            positions = step.span.positions
            rope = {"global": self.args.rope_global.cos_sin(positions, "default", h.dtype),
                    "local": self.args.rope_local.cos_sin(positions, "default", h.dtype)}
            for layer in self.model.layers:
                h = layer(h, rope, step)
        if cache is not None:
            cache.advance(S)
            cache.tag = "default"
        if normed is not None:
            h = normed[:, -1:] if last_only else normed
        else:
            h = self.model.norm(h[:, -1:] if last_only else h)
        if hidden:
            return h
        logits = self.lm_head(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


# ---------------------------------------------------------------- GGUF (llama.cpp's names and keys)
# per-layer tensor names after "blk.N." -> HF names after "model.layers.N."
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                    "post_ffw_norm": "post_feedforward_layernorm"}


def gguf_config(f: GGUFFile) -> dict[str, Any]:
    """The HF-style config of a GGUF gemma3 file (vocab_size comes from the embedding tensor)."""
    m, a = f.metadata, "gemma3"
    head_dim = gguf_value(m, f"{a}.attention.key_length", 256)
    hidden, heads, layers = (gguf_value(m, f"{a}.embedding_length"), gguf_value(m, f"{a}.attention.head_count"),
                             gguf_value(m, f"{a}.block_count"))
    scaling = None
    kind = m.get(f"{a}.rope.scaling.type")
    if kind not in (None, "none"):  # llama.cpp writes linear x8 for Gemma 3 4B / 12B / 27B global layers
        if kind != "linear":
            raise ConfigError(f"{a}.rope.scaling.type", f"unsupported rope scaling {kind!r} (supported: linear)")
        scaling = {"rope_type": "linear", "factor": gguf_value(m, f"{a}.rope.scaling.factor", kind=float)}
    # llama.cpp: attention scale 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(hidden / heads)
    scalar = hidden // heads if layers == 62 else head_dim
    return dict(
        model_type="gemma3", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=gguf_value(m, f"{a}.attention.head_count_kv", 1), head_dim=head_dim,
        intermediate_size=gguf_value(m, f"{a}.feed_forward_length"),
        max_position_embeddings=gguf_value(m, f"{a}.context_length"),
        rms_norm_eps=gguf_value(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-6, kind=float),
        rope_theta=gguf_value(m, f"{a}.rope.freq_base", 1_000_000.0, kind=float),
        rope_local_base_freq=10_000.0, rope_scaling=scaling,  # llama.cpp's local base
        sliding_window=gguf_value(m, f"{a}.attention.sliding_window", 512), sliding_window_pattern=6,
        query_pre_attn_scalar=scalar, tie_word_embeddings="output.weight" not in f.tensors,
        norm_offset=0.0,  # the converter stored (1 + w)
        final_logit_softcapping=gguf_value(m, f"{a}.final_logit_softcapping", None, kind=float),
    )


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Tie lm_head to the embedding; drop the HF multimodal prefix of text-only weights."""
    weights = {k.removeprefix("language_model."): v for k, v in weights.items()}
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
