"""Phi-3.5-MoE (HF `PhimoeForCausalLM`, model_type "phimoe"): the Phi-3 decoder with LayerNorm,
biased attention and lm_head, and a sparse mixture of SwiGLU experts routed by SparseMixer.

Routing at inference is the reference's `sparsemixer(training=False)`, written out in
shared/specs/phi-family.md §3: the top expert by router logit and the best of the rest, each
weighted by a softmax over the experts within a relative gap of 2*router_jitter_noise of it; the
two weights are not renormalised and nothing is random. llama.cpp (renormalised softmax top-2) and
mlx-lm (plain softmax top-2) route differently; a GGUF of this model runs with this routing.

Experts stay one module each under their checkpoint names (`block_sparse_moe.experts.{e}.w1/w2/w3`),
so loading maps the file's tensors without a copy (an expert nobody picks is never paged in),
`--quant` swaps each expert's linears for QuantLinear like any other, and a step runs only the
experts its tokens chose: tokens are grouped by expert, one matmul per chosen expert and weight.
The router is not an nn.Linear: it stays float under quantization, so decisions near the
threshold do not move.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import phi3
from .base import gguf_value, require_float, require_int
from .cache import KVCache, Ragged, Step
from .layers import ACTIVATIONS, attention
from .rope import Rope, apply_rope

if TYPE_CHECKING:
    from ..gguf import GGUFFile


@dataclass
class ModelArgs(phi3.ModelArgs):
    model_type: str = "phimoe"
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    attention_bias: bool = False
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("num_local_experts", self.num_local_experts, minimum=2)
        if self.num_experts_per_tok != 2:  # SparseMixer is defined for top-2 only (as in the reference)
            raise ConfigError("num_experts_per_tok", f"Phi-MoE's SparseMixer routes top-2; got "
                              f"{self.num_experts_per_tok!r}")
        require_float("router_jitter_noise", self.router_jitter_noise, positive=False)
        for name in ("attention_bias", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")


def sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference routing: scores [T, E] router logits -> (expert ids [T, 2], weights [T, 2]), in
    the scores' dtype, as the reference computes them (same operations, same order)."""
    neg = float("-inf")
    m1, i1 = scores.max(dim=-1, keepdim=True)
    gap1 = (m1 - scores) / scores.abs().clamp(min=m1) > 2 * eps
    w1 = scores.masked_fill(gap1, neg).softmax(dim=-1).gather(-1, i1)
    rest = scores.scatter(-1, i1, neg)
    m2, i2 = rest.max(dim=-1, keepdim=True)
    gap2 = (m2 - scores) / scores.abs().clamp(min=m2) > 2 * eps  # the original scores, clamped at m2
    w2 = rest.masked_fill(gap2, neg).softmax(dim=-1).gather(-1, i2)
    return torch.cat((i1, i2), dim=-1), torch.cat((w1, w2), dim=-1)


class Router(nn.Module):
    """The gate (hidden -> n_experts logits, no bias); a plain weight, not an nn.Linear, so that
    quantizing the model leaves it float."""

    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.linear(x, self.weight)
        # bf16/fp16: accumulate in float32 and round once, as a bf16 matmul does, without the cost of a
        # low-precision GEMM primitive for 16 outputs (3x faster per decode step here)
        return F.linear(x.float(), self.weight.float()).to(x.dtype)


class Expert(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # up
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.eps = layer, args.router_jitter_noise
        self.gate = Router(args.hidden_size, args.num_local_experts)
        self.experts = nn.ModuleList(Expert(args) for _ in range(args.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, 2], weights [T, 2])."""
        return sparsemixer(self.gate(x), self.eps)

    def forward(self, h: torch.Tensor, trace: Routing | None) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        pair = ids[0].tolist() if x.shape[0] == 1 else None
        if pair is not None and pair[0] != pair[1]:  # one token (a decode step): its two experts directly
            first, second = sorted(range(2), key=pair.__getitem__)  # ascending id, as the grouped path adds
            out = (self.experts[pair[first]](x) * weights[:, first, None]).to(x.dtype)
            out = out + (self.experts[pair[second]](x) * weights[:, second, None]).to(x.dtype)
        else:
            out = torch.zeros_like(x)
            # one pass per expert some token chose: its tokens' rows in one matmul (a decode step reads
            # the chosen experts' weights only)
            for e in ids.unique().tolist():
                tok, slot = (ids == e).nonzero(as_tuple=True)
                y = self.experts[e](x[tok]) * weights[tok, slot, None]
                out.index_add_(0, tok, y.to(out.dtype))
        if trace is not None:
            trace.record(self.layer, ids.view(*shape[:-1], 2), weights.view(*shape[:-1], 2))
        return out.view(shape)


class Routing:
    """What the MoE layers chose in the passes it was attached to: per layer, the expert ids and
    weights [B, S, 2] of each pass, and the running hit count of every expert (a token choosing it)."""

    def __init__(self, n_layers: int, n_experts: int):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.hits = torch.zeros(n_layers, n_experts, dtype=torch.int64, device="cpu")  # (built on meta too)
        self.passes: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        self.keep_passes = False

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.hits[layer] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.n_experts)
        if self.keep_passes:
            if layer == 0 or not self.passes:
                self.passes.append({})
            self.passes[-1][layer] = (ids.detach().cpu(), weights.detach().float().cpu())


class Attention(phi3.Attention):
    """Phi-3's attention with separate (biased) q/k/v projections, as the checkpoint stores them."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        del self.qkv_proj
        q_size, kv_size = self.splits[0], self.splits[1]
        self.q_proj = nn.Linear(args.hidden_size, q_size, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_size, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        out = attention(q, k, v, step.span, window=self.window, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.block_sparse_moe = SparseMoe(args, layer)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                trace: Routing | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, step)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h), trace)


class PhimoeModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """PhimoeForCausalLM. forward(input_ids [B, S], cache) -> logits [B, S or 1, vocab].
    `routing` (a Routing, or None): where each pass records its expert choices."""

    keep_mapped = (".block_sparse_moe.experts.",)  # not copied by weight packing: stay memory-mapped

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = PhimoeModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)
        self.routing: Routing | None = Routing(args.num_hidden_layers, args.num_local_experts)

    @property
    def rope(self) -> Rope:
        return self.args.rope

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        S = input_ids.shape[1]
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        step = Step.of(cache, S, input_ids.device)
        positions = step.span.positions
        regime = self.rope.regime(int(positions.max()) + 1)
        if isinstance(step.span, Ragged):
            rope = self.rope.cos_sin_rows(positions, h.dtype)
        else:
            rope = self.rope.cos_sin(positions, regime, h.dtype)
        for layer in self.model.layers:
            h = layer(h, rope, step, self.routing)
        if cache is not None:
            cache.advance(S)
            cache.tag = regime
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))


# ---------------------------------------------------------------- GGUF (llama.cpp's phimoe names)
# per-layer names after "blk.N." -> ours after "model.layers.N."; the stacked expert tensors
# ffn_{gate,up,down}_exps [E, ...] are split per expert (`gguf_expert_names`)
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                    "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "block_sparse_moe.gate"}
GGUF_FLOAT_TENSORS = ("ffn_gate_inp",)  # the router: dequantized if a file quantized it, never run quantized
GGUF_EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}


PHI35_MOE_MSCALE = 1.243163121016122  # Phi-3.5-MoE-instruct's config.json short_mscale == long_mscale


def gguf_config(f: GGUFFile) -> dict[str, Any]:
    """The HF-style config of a GGUF phimoe file (llama.cpp's converter keys)."""
    m, a = f.metadata, "phimoe"
    hidden, heads = gguf_value(m, f"{a}.embedding_length"), gguf_value(m, f"{a}.attention.head_count")
    if heads > hidden or hidden % heads:
        raise ConfigError(f"{a}.attention.head_count", f"{heads} heads do not divide the embedding length {hidden}")
    cfg: dict[str, Any] = dict(
        model_type="phimoe", hidden_size=hidden, num_hidden_layers=gguf_value(m, f"{a}.block_count"),
        num_attention_heads=heads, num_key_value_heads=gguf_value(m, f"{a}.attention.head_count_kv", heads),
        intermediate_size=gguf_value(m, f"{a}.expert_feed_forward_length",
                                     gguf_value(m, f"{a}.feed_forward_length", None)),
        max_position_embeddings=gguf_value(m, f"{a}.context_length"),
        rms_norm_eps=gguf_value(m, f"{a}.attention.layer_norm_epsilon",
                                gguf_value(m, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, kind=float), kind=float),
        rope_theta=gguf_value(m, f"{a}.rope.freq_base", 10000.0, kind=float),
        num_local_experts=gguf_value(m, f"{a}.expert_count"),
        num_experts_per_tok=gguf_value(m, f"{a}.expert_used_count", 2),
        attention_bias="blk.0.attn_q.bias" in f.tensors, lm_head_bias="output.bias" in f.tensors,
    )
    if cfg["intermediate_size"] is None:
        raise ConfigError(f"{a}.expert_feed_forward_length", "is required in the GGUF metadata but missing")
    # the converter does not write router_jitter_noise: Phi-3.5-MoE's (and PhimoeConfig's) 0.01
    cfg["router_jitter_noise"] = gguf_value(m, f"{a}.router_jitter_noise", 0.01, kind=float)
    if "rope_factors_long.weight" in f.tensors:
        cfg["original_max_position_embeddings"] = gguf_value(m, f"{a}.rope.scaling.original_context_length")
        # llama.cpp's converter writes an attn_factor computed from max_pos/orig (1.1902 for
        # 131072/4096) and drops the config's short/long mscale: the file cannot carry them, so
        # Phi-3.5-MoE's own value is used unless the file names its own (keys below)
        cfg["rope_scaling"] = {
            "type": "longrope", "long_factor": f.tensor("rope_factors_long.weight").tolist(),
            "short_factor": f.tensor("rope_factors_short.weight").tolist(),
            "short_mscale": gguf_value(m, f"{a}.rope.scaling.short_mscale", PHI35_MOE_MSCALE, kind=float),
            "long_mscale": gguf_value(m, f"{a}.rope.scaling.long_mscale", PHI35_MOE_MSCALE, kind=float),
        }
    return cfg


def gguf_expert_names(name: str, n_experts: int) -> list[str] | None:
    """Our names of the experts stacked in "blk.N.ffn_{gate,up,down}_exps.weight" ([E, out, in];
    the loader splits it into per-expert views, no copy); None for any other tensor."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_EXPERT_NAMES or parts[3] != "weight":
        return None
    w = GGUF_EXPERT_NAMES[parts[2]]
    return [f"model.layers.{parts[1]}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(n_experts)]


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
