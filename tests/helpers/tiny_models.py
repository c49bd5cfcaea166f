"""Tiny random-weight models written as real Hugging Face folders (config.json, safetensors, tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.helpers.tiny_tokenizer import build_phi_tokenizer

# Phi-3.5-mini-like shapes scaled down: head_dim 16, 4 layers.
PHI3_BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)

# The four configurations the issue asks for.
PHI3_VARIANTS: dict[str, dict[str, Any]] = {
    "mha_sliding": dict(sliding_window=8),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128),
    "longrope": dict(
        max_position_embeddings=1024, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope",
                      "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [1.5 + 2.0 * i for i in range(8)]},
    ),
    "partial_rotary": dict(partial_rotary_factor=0.5),
}


def make_phi3_folder(folder: Path, variant: str = "gqa", *, tokenizer_variant: str = "phi3-mini-june",
                     seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Write a random Phi3ForCausalLM (built by transformers) plus a real tokenizer into `folder`."""
    from transformers import Phi3Config, Phi3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer(folder, tokenizer_variant)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    from tokenizers import Tokenizer as HFTok

    n_tok = HFTok.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    vocab = (n_tok + 63) // 64 * 64  # padded embedding rows, like 32011 -> 32064
    end_id = HFTok.from_file(str(folder / "tokenizer.json")).token_to_id("<|endoftext|>")
    cfg = dict(PHI3_BASE, **PHI3_VARIANTS[variant], vocab_size=vocab, bos_token_id=1, eos_token_id=end_id,
               pad_token_id=end_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = Phi3Config(**cfg)
    model = Phi3ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # default init is too small to give varied greedy text; widen it
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    gen = {"bos_token_id": 1, "eos_token_id": [end_id, HFTok.from_file(str(folder / "tokenizer.json"))
                                               .token_to_id("<|end|>")], "pad_token_id": end_id}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    assert tok_cfg  # tokenizer_config.json written by the builder
    return folder


GEMMA3_BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, query_pre_attn_scalar=32, sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
)


def make_gemma3_folder(folder: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random Gemma3ForCausalLM (model_type gemma3_text) built by transformers, with a real tokenizer."""
    from tokenizers import Tokenizer as HFTok
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer(folder, "phi3-mini-april")  # any real tokenizer: parity is about the network
    n_tok = HFTok.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    cfg = dict(GEMMA3_BASE, vocab_size=(n_tok + 63) // 64 * 64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.08)  # non-trivial norm weights test the (1 + w) form
    model.save_pretrained(folder, safe_serialization=True)
    return folder
