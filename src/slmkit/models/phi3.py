"""Phi-3 / Phi-3.5 dense decoder (HF `Phi3ForCausalLM`, model_type "phi3").

Covers Phi-3-mini-4k/128k, Phi-3.5-mini, Phi-3-medium (GQA) and the language model of the
vision models. HF weight names and fused layouts are kept (`qkv_proj` = [q|k|v] contiguous,
`gate_up_proj` = [gate|up]) so loading is a plain `load_state_dict`.
Reference: transformers/models/phi3/modeling_phi3.py and the models' config.json on the Hugging Face Hub.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import fused
from .base import MAX_POSITIONS, BaseArgs, gguf_value, require_float, require_int
from .cache import KVCache, Ragged, Step
from .layers import ACTIVATIONS, RMSNorm, attention
from .rope import Rope, apply_rope, build_rope

if TYPE_CHECKING:
    from ..gguf import GGUFFile


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    model_type: str = "phi3"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 writes this instead of rope_scaling
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            require_int(name, getattr(self, name))
        require_int("max_position_embeddings", self.max_position_embeddings, maximum=MAX_POSITIONS)
        if self.original_max_position_embeddings is not None:
            require_int("original_max_position_embeddings", self.original_max_position_embeddings,
                        maximum=MAX_POSITIONS)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        require_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("num_attention_heads", f"does not divide hidden_size {self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        require_int("head_dim", self.head_dim)
        require_float("rms_norm_eps", self.rms_norm_eps)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ConfigError("hidden_act", f"unsupported activation {self.hidden_act!r}")
        if self.sliding_window is not None:
            require_int("sliding_window", self.sliding_window)
        scaling = self.rope_scaling or self.rope_parameters
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError("rope_scaling", "must be an object or null")
        if scaling:  # rope_parameters may carry theta / partial rotary itself
            self.rope_theta = scaling.get("rope_theta", self.rope_theta)
            self.partial_rotary_factor = scaling.get("partial_rotary_factor", self.partial_rotary_factor)
        require_float("rope_theta", self.rope_theta)
        if not 0 < require_float("partial_rotary_factor", self.partial_rotary_factor) <= 1:
            raise ConfigError("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        self.rope = build_rope(
            head_dim=self.head_dim, theta=self.rope_theta, partial_rotary_factor=self.partial_rotary_factor,
            scaling=scaling, max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer  # its index in the cache
        assert args.num_key_value_heads is not None and args.head_dim is not None  # filled by __post_init__
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.splits = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=False)
        self.window = args.sliding_window
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin = rope
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        out = attention(q, k, v, step.span, window=self.window, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # SiLU through the kernel where it runs: the fused decode step's own (the same bits)
        a = fused.silu_mul(gate_up) if self.act is F.silu else None
        if a is None:
            gate, up = gate_up.chunk(2, dim=-1)  # first half is the gate
            a = up * self.act(gate)
        return self.down_proj(a)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """Phi3ForCausalLM. forward(input_ids [B, S], cache) -> logits [B, S or 1, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Phi3Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._plan = fused.PlanCache()  # the fused decode step's (_decode_fused)

    @property
    def rope(self) -> Rope:
        return self.args.rope

    def _apply(self, *args: Any, **kwargs: Any) -> Model:
        self._plan.clear()  # .to() and the like move the weights the fused step points into
        return super()._apply(*args, **kwargs)

    def _decode_fused(self, h: torch.Tensor, cache: KVCache, regime: str) -> torch.Tensor | None:
        """A few new tokens of one row through every layer and the final norm in one kernel call
        (kernels/fused.cpp, as gemma3.Model's): the normed hidden states (h is updated in place);
        None where it cannot run (then the layers run one op at a time, with the same bits)."""
        lib = fused.step_lib(h)
        plan = None if lib is None else self._plan.get(
            self, lib, lambda: fused.phi3_plan(list(self.model.layers), self.model.norm, self.args))
        if plan is None:
            return None
        pos, S = cache.offset, h.shape[1]
        cos, sin = self.rope.cos_sin(torch.arange(pos, pos + S), regime, h.dtype)
        return fused.phi3_decode(plan, h, cache.k, cache.v, pos, cos, sin)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings [B, S, hidden] (what a multimodal prompt overwrites at its image positions)."""
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                inputs_embeds: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """inputs_embeds [B, S, hidden]: the embeddings to run instead of input_ids' (images merged in).
        hidden: return the final-normed hidden states [B, S, hidden] (what lm_head reads) instead of logits."""
        S = input_ids.shape[1]
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        normed = None
        if S <= fused.MAX_FUSED_TOKENS and type(cache) is KVCache and inputs_embeds is None:
            regime = self.rope.regime(cache.offset + S)
            normed = self._decode_fused(h, cache, regime)  # h: a fresh lookup, updated in place
        if normed is None:
            step = Step.of(cache, S, input_ids.device)
            positions = step.span.positions
            regime = self.rope.regime(int(positions.max()) + 1)
            if isinstance(step.span, Ragged):  # rows at their own lengths: a frequency set per row
                rope = self.rope.cos_sin_rows(positions, h.dtype)
            else:
                rope = self.rope.cos_sin(positions, regime, h.dtype)
            for layer in self.model.layers:
                h = layer(h, rope, step)
        if cache is not None:
            cache.advance(S)
            cache.tag = regime
        if normed is not None:
            h = normed[:, -1:] if last_only else normed
        else:
            h = self.model.norm(h[:, -1:] if last_only else h)
        return h if hidden else self.lm_head(h)


# ---------------------------------------------------------------- GGUF (llama.cpp's names and keys)
# per-layer tensor names after "blk.N." -> HF names after "model.layers.N."
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
                    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}


def gguf_config(f: GGUFFile) -> dict[str, Any]:
    """The HF-style config of a GGUF phi3 file (vocab_size comes from the embedding tensor)."""
    m, a = f.metadata, "phi3"
    hidden, heads = gguf_value(m, f"{a}.embedding_length"), gguf_value(m, f"{a}.attention.head_count")
    if heads > hidden or hidden % heads:
        raise ConfigError(f"{a}.attention.head_count", f"{heads} heads do not divide the embedding length {hidden}")
    ctx = gguf_value(m, f"{a}.context_length")
    cfg: dict[str, Any] = dict(
        model_type="phi3", hidden_size=hidden, num_hidden_layers=gguf_value(m, f"{a}.block_count"),
        num_attention_heads=heads, num_key_value_heads=gguf_value(m, f"{a}.attention.head_count_kv", heads),
        intermediate_size=gguf_value(m, f"{a}.feed_forward_length"), max_position_embeddings=ctx,
        rms_norm_eps=gguf_value(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        rope_theta=gguf_value(m, f"{a}.rope.freq_base", 10000.0, kind=float),
        sliding_window=gguf_value(m, f"{a}.attention.sliding_window", None),
        tie_word_embeddings="output.weight" not in f.tensors,  # Phi-4-mini: the converter writes no output
    )
    head_dim = hidden // heads
    rot = gguf_value(m, f"{a}.rope.dimension_count", head_dim)
    if rot > head_dim:
        raise ConfigError(f"{a}.rope.dimension_count", f"{rot} is more than the head dimension {head_dim}")
    cfg["partial_rotary_factor"] = rot / head_dim
    if "rope_factors_long.weight" in f.tensors:  # LongRoPE: the factor lists travel as tensors
        cfg["original_max_position_embeddings"] = gguf_value(m, f"{a}.rope.scaling.original_context_length")
        cfg["rope_scaling"] = {
            "type": "longrope",
            "long_factor": f.tensor("rope_factors_long.weight").tolist(),
            "short_factor": f.tensor("rope_factors_short.weight").tolist(),
            "attention_factor": gguf_value(m, f"{a}.rope.scaling.attn_factor", None, kind=float),
        }
    if cfg["sliding_window"] is not None and cfg["sliding_window"] >= ctx:
        cfg["sliding_window"] = None  # a window as long as the context is no window
    return cfg


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map checkpoint names onto ours: drop stale rotary buffers, tie lm_head when configured."""
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
