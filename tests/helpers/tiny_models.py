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


# A tiny Phi-3-vision: the LM as PHI3_BASE (gqa), a 3-layer CLIP tower of width 32 at the real
# 336-pixel crop and 14-pixel patch (so the HD transform's 24x24 -> 12x12 grid is the real one).
PHI3V_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                    projection_dim=16)


def make_phi3v_folder(folder: Path, *, seed: int = 0, num_crops: int = 4, dtype: torch.dtype = torch.float32,
                      **overrides: Any) -> Path:
    """A random Phi3VForCausalLM folder as the hub lays it out (config with img_processor / embd_layer
    and a top-level vision_config, `model.vision_embed_tokens.*` weights including the CLIP layers
    and post_layernorm the model does not use), the phi3-vision tokenizer and a
    preprocessor_config.json. The LM is built by transformers' Phi3ForCausalLM, the tower by its
    CLIPVisionModel."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as HFTok
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer(folder, "phi3-vision")
    tk = HFTok.from_file(str(folder / "tokenizer.json"))
    vocab = (tk.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    end_id, eot = tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|end|>")
    text = dict(PHI3_BASE, **PHI3_VARIANTS["gqa"], vocab_size=vocab, bos_token_id=1, eos_token_id=end_id,
                pad_token_id=end_id, max_position_embeddings=8192)  # room for a few images of ~757 tokens
    vision = dict(PHI3V_VISION)
    text.update({k: v for k, v in overrides.items() if k != "vision_config"})
    vision.update(overrides.get("vision_config", {}))
    torch.manual_seed(seed)
    lm = Phi3ForCausalLM(Phi3Config(**text)).eval()
    tower = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
    c, h = vision["hidden_size"], text["hidden_size"]
    with torch.no_grad():  # wider than the default init, and non-trivial norms, so mistakes show
        for name, p in list(lm.named_parameters()) + list(tower.named_parameters()):
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.05)
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    clip = "model.vision_embed_tokens.img_processor.vision_model."  # hub names (transformers 5 has no vision_model.)
    state.update({clip + k: v.clone() for k, v in tower.state_dict().items()})
    g = torch.Generator().manual_seed(seed + 1)
    extra = {"img_projection.0.weight": (h, 4 * c), "img_projection.0.bias": (h,), "img_projection.2.weight": (h, h),
             "img_projection.2.bias": (h,), "glb_GN": (1, 1, 4 * c), "sub_GN": (1, 1, 1, 4 * c)}
    for name, shape in extra.items():
        state[f"model.vision_embed_tokens.{name}"] = torch.randn(shape, generator=g) * 0.1
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = dict(text, model_type="phi3_v", architectures=["Phi3VForCausalLM"], torch_dtype="float32",
                  img_processor={"image_dim_out": c, "model_name": "openai/clip-vit-large-patch14-336",
                                 "name": "clip_vision_model", "num_img_tokens": 144},
                  embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                              "use_hd_transform": True, "with_learnable_separator": True},
                  vision_config=vision)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [end_id, eot]}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Phi3VImageProcessor", "num_crops": num_crops, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def make_phimoe_folder(folder: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random PhimoeForCausalLM (Phi-3.5-MoE's architecture, built by transformers: 4 experts, 2 per
    token) with the phi3 tokenizer."""
    from tokenizers import Tokenizer as HFTok
    from transformers import PhimoeConfig, PhimoeForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer(folder, "phi3-mini-june")
    tk = HFTok.from_file(str(folder / "tokenizer.json"))
    vocab = (tk.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    end_id, eot = tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|end|>")
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=end_id, pad_token_id=end_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PhimoeForCausalLM(PhimoeConfig(**cfg)).eval()
    with torch.no_grad():  # wider than the default init, so that greedy text varies and routing matters
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):  # attention / lm_head / LayerNorm biases: non-zero, so they count
                p.normal_(0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [end_id, eot]}))
    return folder
