"""Phi-3-small (7B, 8k and 128k; HF remote code `Phi3SmallForCausalLM`, model_type "phi3small").

What differs from the dense Phi-3 decoder (models/phi3.py), per /work/shared/specs/phi-family.md §2:
LayerNorm with bias; embeddings x mup_embedding_multiplier; one `query_key_value` Linear with bias
whose output is grouped per kv head ([q_per_kv q heads, k, v] per group); attention scale
mup_attn_multiplier / head_dim; a GEGELU MLP on an interleaved split with a clamp; blocksparse
attention on every layer but each `dense_attention_every_n_layers`-th; a tied head whose logits are
divided by mup_width_multiplier, the tokenizer's unused (dummy) ids at -inf.

Blocksparse layers: block size b, local blocks n, vertical stride s; query block i sees key block j
of head h when j <= i and (i - j < n or (j + h * max(1, s // heads) + 1) % s == 0), with token
causality inside. Up to n * b positions that is exactly causal attention, which the shared
attention() (compiled kernel) runs; past that an explicit mask goes to SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import MAX_POSITIONS, BaseArgs, require_float, require_int
from .cache import KVCache, Ragged, Step
from .layers import attention
from .rope import Rope, apply_rope, build_rope

# cl100k's BPE ranks are 0..100255; Phi-3-small's named added tokens (spec §2); the other ids up to
# vocab_size (100352) are `<|dummy_id_N|>` padding whose logits are -inf
CL100K_RANKS = 100256
NAMED_SPECIAL_IDS = frozenset({100257, 100258, 100259, 100260, 100261, 100262, 100263, 100266, 100276})
MASK_ELEMENTS = 1 << 26  # most mask entries one blocksparse SDPA call builds (a 64 MiB bool mask)


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    ff_intermediate_size: int
    vocab_size: int
    model_type: str = "phi3small"
    max_position_embeddings: int = 8192
    original_max_position_embeddings: int | None = None
    rope_embedding_base: float = 1e6
    rope_position_scale: float = 1.0
    rope_scaling: dict | None = None
    layer_norm_epsilon: float = 1e-5
    hidden_act: str = "gegelu"
    gegelu_limit: float = 20.0
    gegelu_pad_to_256: bool = True
    dense_attention_every_n_layers: int = 2
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    mup_attn_multiplier: float = 1.0
    mup_embedding_multiplier: float = 10.0
    mup_use_scaling: bool = True
    mup_width_multiplier: float = 8.0
    dummy_token_indices: list | None = None
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "ff_intermediate_size", "vocab_size", "dense_attention_every_n_layers",
                     "blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride"):
            require_int(name, getattr(self, name))
        require_int("max_position_embeddings", self.max_position_embeddings, maximum=MAX_POSITIONS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("num_attention_heads", f"does not divide hidden_size {self.hidden_size}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "gegelu":
            raise ConfigError("hidden_act", f"Phi-3-small supports only 'gegelu', got {self.hidden_act!r}")
        for name in ("rope_embedding_base", "rope_position_scale", "layer_norm_epsilon", "gegelu_limit",
                     "mup_attn_multiplier", "mup_embedding_multiplier", "mup_width_multiplier"):
            require_float(name, getattr(self, name))
        self.intermediate_size = self.ff_intermediate_size
        if self.gegelu_pad_to_256:
            self.intermediate_size = -(-self.ff_intermediate_size // 256) * 256
        self.dummy_ids = self._dummy_ids()
        scaling = self.rope_scaling
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError("rope_scaling", "must be an object or null")
        if not scaling and self.rope_position_scale != 1.0:
            scaling = {"type": "linear", "factor": self.rope_position_scale}
        self.rope = build_rope(
            head_dim=self.head_dim, theta=self.rope_embedding_base, partial_rotary_factor=1.0, scaling=scaling,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings,
        )

    def _dummy_ids(self) -> list[int]:
        ids = self.dummy_token_indices
        if ids is None:
            # the checkpoints' config.json does not list them (the remote config class asks its
            # tokenizer): every id past cl100k's ranks that is not a named special token
            ids = [i for i in range(CL100K_RANKS, self.vocab_size) if i not in NAMED_SPECIAL_IDS]
        if not isinstance(ids, list):
            raise ConfigError("dummy_token_indices", "must be a list of token ids")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ConfigError("dummy_token_indices", f"has {i!r}, not an id below vocab_size {self.vocab_size}")
        return sorted(set(ids))

    def is_dense(self, layer: int) -> bool:
        return (layer + 1) % self.dense_attention_every_n_layers == 0


def blocksparse_mask(qpos: torch.Tensor, L: int, n_heads: int, *, block: int, local: int, vert: int,
                     homo_head: bool = False) -> torch.Tensor:
    """[B, H or 1, S, L] bool: which keys 0..L-1 the queries at qpos [B, S] see in a blocksparse layer
    (causal within; keys past a row's own position are masked, so ragged rows are right)."""
    kpos = torch.arange(L, device=qpos.device)
    qb, kb = (qpos // block)[:, None, :, None], (kpos // block)[None, None, None, :]
    if homo_head:
        head = torch.zeros(1, dtype=torch.long, device=qpos.device)
    else:
        head = torch.arange(n_heads, device=qpos.device) * max(1, vert // n_heads)
    vertical = (kb + head[None, :, None, None] + 1) % vert == 0
    allowed = (qb - kb < local) | vertical
    return allowed & (kpos[None, None, None, :] <= qpos[:, None, :, None])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_per_kv = self.n_heads // self.n_kv
        self.query_key_value = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, args.hidden_size)
        norm = self.head_dim / args.mup_attn_multiplier if args.mup_use_scaling else self.head_dim**0.5
        self.scale = 1.0 / norm
        self.sparse = not args.is_dense(layer)
        self.block, self.local = args.blocksparse_block_size, args.blocksparse_num_local_blocks
        self.vert, self.homo_head = args.blocksparse_vert_stride, args.blocksparse_homo_head_pattern

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin = rope
        qkv = self.query_key_value(x).view(B, S, self.n_kv, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)  # [B, Hkv, S, D]
        v = qkv[:, :, :, -1].transpose(1, 2).contiguous()
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        out = self._attend(q, k, v, step)
        return self.dense(out.transpose(1, 2).reshape(B, S, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        qpos = step.span.positions  # [1 or B, S]
        if not self.sparse or int(qpos.max()) < self.local * self.block:
            return attention(q, k, v, step.span, window=None, scale=self.scale)  # dense-causal here
        # the mask is [rows, heads, queries, keys]: a long prefill goes in query chunks of bounded size
        S, L = q.shape[2], k.shape[2]
        chunk = max(1, MASK_ELEMENTS // (q.shape[0] * self.n_heads * L))
        outs = []
        for i in range(0, S, chunk):
            mask = blocksparse_mask(qpos[:, i:i + chunk], L, self.n_heads, block=self.block, local=self.local,
                                    vert=self.vert, homo_head=self.homo_head)
            outs.append(F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, attn_mask=mask, scale=self.scale,
                                                       enable_gqa=self.n_kv != self.n_heads))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def gegelu(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Interleaved GEGELU: even features through quick-GELU (clamped above), odd ones linear + 1
    (clamped both ways); infinities are left as they are, as the reference does."""
    a_gelu, a_lin = x[..., ::2], x[..., 1::2]
    a_gelu = torch.where(torch.isinf(a_gelu), a_gelu, a_gelu.clamp(max=limit))
    a_lin = torch.where(torch.isinf(a_lin), a_lin, a_lin.clamp(-limit, limit))
    return a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_lin + 1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size)
        self.limit = args.gegelu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3SmallModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)


class Model(nn.Module):
    """Phi3SmallForCausalLM. forward(input_ids [B, S], cache) -> logits [B, S or 1, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Phi3SmallModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # tied (sanitize)
        self.logit_scale = 1.0 / args.mup_width_multiplier if args.mup_use_scaling else 1.0

    @property
    def rope(self) -> Rope:
        return self.args.rope

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.args.mup_embedding_multiplier

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                inputs_embeds: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """As models/phi3.Model.forward; `hidden` returns the final-normed states before the head."""
        S = input_ids.shape[1]
        h = self.embed_text(input_ids) if inputs_embeds is None else inputs_embeds
        step = Step.of(cache, S, input_ids.device)
        positions = step.span.positions
        regime = self.rope.regime(int(positions.max()) + 1)
        if isinstance(step.span, Ragged):
            rope = self.rope.cos_sin_rows(positions, h.dtype)
        else:
            rope = self.rope.cos_sin(positions, regime, h.dtype)
        for layer in self.model.layers:
            h = layer(h, rope, step)
        if cache is not None:
            cache.advance(S)
            cache.tag = regime
        if last_only:
            h = h[:, -1:]
        h = self.model.final_layernorm(h)
        if hidden:
            return h
        logits = self.lm_head(h) * self.logit_scale
        if self.args.dummy_ids:
            logits[..., self.args.dummy_ids] = float("-inf")
        return logits


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Drop stale rotary buffers; the head is the embedding (tied) unless the checkpoint has one."""
    weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
