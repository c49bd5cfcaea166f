"""Phi-3-vision / Phi-3.5-vision (HF hub `Phi3VForCausalLM`, model_type "phi3_v").

The language model is Phi-3 unchanged (models/phi3.py). Images go through a CLIP ViT tower
(ViT-L/14-336 per `img_processor`, or the shape a top-level `vision_config` declares), read at
`hidden_states[layer_idx]` (-2: the output of the second-to-last encoder layer, so only the layers
up to it are built) with the CLS token dropped and no post-layernorm; then the HD transform: each
24x24 crop grid is merged 2x2 into 12x12 tokens of 4*C, the crops are tiled into one grid with a
learned `sub_GN` vector at each row's end, followed by `glb_GN` and the global image (a 1x1 grid,
rows also ended by `sub_GN`), and projected by Linear(4C, hidden) -> GELU -> Linear(hidden, hidden).
Weights as in the hub folders: `model.vision_embed_tokens.{img_processor.vision_model.*,
img_projection.{0,2}.*, glb_GN, sub_GN}`.
Reference: the hub's modeling_phi3_v.py / image_embedding_phi3_v.py; phi-family.md §4.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import phi3
from .base import require_float, require_int
from .phi3 import gguf_config as gguf_config  # noqa: F401 -- the language model's GGUF form, if any

CROP = 336  # pixels per crop side (the processor's fixed crop size)
VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
VISION_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
                      "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
KEEP_FLOAT = ("model.vision_embed_tokens",)  # never quantized nor packed: the tower keeps its float weights


@dataclass
class VisionArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    num_channels: int = 3

    @classmethod
    def parse(cls, cfg: dict[str, Any], where: str) -> VisionArgs:
        args = cls(**{k: cfg.get(k, v) for k, v in VIT_L_336.items()})
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
            require_int(f"{where}.{name}", getattr(args, name))
        require_int(f"{where}.num_channels", args.num_channels, maximum=3)
        require_int(f"{where}.image_size", args.image_size, minimum=CROP, maximum=CROP)  # the processor's crops
        require_float(f"{where}.layer_norm_eps", args.layer_norm_eps)
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError(f"{where}.num_attention_heads", f"does not divide hidden_size {args.hidden_size}")
        grid = CROP // args.patch_size
        if CROP % args.patch_size or grid % 2:
            raise ConfigError(f"{where}.patch_size", f"{args.patch_size} must tile {CROP} into an even grid")
        if args.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"{where}.hidden_act", f"unsupported activation {args.hidden_act!r}")
        return args


@dataclass
class ModelArgs(phi3.ModelArgs):
    model_type: str = "phi3_v"
    img_processor: dict | None = None
    embd_layer: dict | None = None
    vision_config: dict | None = None
    vision_feature_layer: int | None = None
    vision: VisionArgs = field(init=False)
    feature_layer: int = field(init=False)  # encoder layers the tower builds and runs

    def __post_init__(self) -> None:
        super().__post_init__()
        proc = self.img_processor if self.img_processor is not None else {}
        embd = self.embd_layer if self.embd_layer is not None else {}
        for name, value in (("img_processor", proc), ("embd_layer", embd)):
            if not isinstance(value, dict):
                raise ConfigError(name, "must be an object")
        if self.vision_config is not None and not isinstance(self.vision_config, dict):
            raise ConfigError("vision_config", "must be an object")
        where = "vision_config" if self.vision_config is not None else "img_processor"
        self.vision = VisionArgs.parse(self.vision_config or {}, where)
        dim = proc.get("image_dim_out", self.vision.hidden_size)
        if dim != self.vision.hidden_size:
            raise ConfigError("img_processor.image_dim_out", f"is {dim!r}, the tower's hidden size is "
                              f"{self.vision.hidden_size}")
        for key, want in (("use_hd_transform", True), ("with_learnable_separator", True),
                          ("hd_transform_order", "sub_glb"), ("projection_cls", "mlp"), ("embedding_cls", "image")):
            if embd.get(key, want) != want:
                raise ConfigError(f"embd_layer.{key}", f"only {want!r} is supported, got {embd[key]!r}")
        if proc.get("type_feature", "patch") != "patch":
            raise ConfigError("img_processor.type_feature", "only 'patch' is supported")
        idx = proc.get("layer_idx", self.vision_feature_layer if self.vision_feature_layer is not None else -2)
        n = self.vision.num_hidden_layers
        if isinstance(idx, bool) or not isinstance(idx, int) or not -n <= idx <= n:
            raise ConfigError("img_processor.layer_idx", f"must be an integer in [-{n}, {n}], got {idx!r}")
        self.feature_layer = idx + n + 1 if idx < 0 else idx  # hidden_states[idx] follows this many layers


class ClipAttention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.heads, self.head_dim = a.num_attention_heads, a.hidden_size // a.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(a.hidden_size, a.hidden_size)
                                                                for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = (p(x).view(B, S, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                         self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(B, S, C))


class ClipMLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(a.hidden_size, a.intermediate_size), nn.Linear(a.intermediate_size,
                                                                                    a.hidden_size)
        self.act = VISION_ACTIVATIONS[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.self_attn = ClipAttention(a)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = ClipMLP(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(a.hidden_size))
        self.patch_embedding = nn.Conv2d(a.num_channels, a.hidden_size, a.patch_size, a.patch_size, bias=False)
        self.position_embedding = nn.Embedding((a.image_size // a.patch_size) ** 2 + 1, a.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipEncoder(nn.Module):
    def __init__(self, a: VisionArgs, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(a) for _ in range(n_layers))


class ClipVisionTransformer(nn.Module):
    """CLIPVisionModel's `vision_model` up to the feature layer (no post_layernorm: it is not read)."""

    def __init__(self, a: VisionArgs, n_layers: int):
        super().__init__()
        self.embeddings = ClipEmbeddings(a)
        self.pre_layrnorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)  # (sic: CLIP's name)
        self.encoder = ClipEncoder(a, n_layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            h = layer(h)
        return h


class ClipVisionModel(nn.Module):
    def __init__(self, a: VisionArgs, n_layers: int):
        super().__init__()
        self.vision_model = ClipVisionTransformer(a, n_layers)


class ImageEmbedding(nn.Module):
    """`vision_embed_tokens`: pixels of one image's crops -> its image-token embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        v = args.vision
        self.grid = CROP // v.patch_size // 2  # tokens per crop side after the 2x2 merge (12)
        c4 = 4 * v.hidden_size
        self.img_processor = ClipVisionModel(v, args.feature_layer)
        self.img_projection = nn.Sequential(nn.Linear(c4, args.hidden_size), nn.GELU(),
                                            nn.Linear(args.hidden_size, args.hidden_size))
        self.glb_GN = nn.Parameter(torch.empty(1, 1, c4))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, c4))

    def _rows(self, grid: torch.Tensor) -> torch.Tensor:
        """[H, W, 4C] -> [H * (W + 1), 4C]: a sub_GN after each row."""
        sep = self.sub_GN[0].expand(grid.shape[0], 1, -1)
        return torch.cat([grid, sep], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """crops [1 + rows*cols, 3, 336, 336] (the global image first) -> [n_tokens, hidden]."""
        feats = self.img_processor.vision_model(crops)[:, 1:]  # CLS dropped: [n, g*g*4, C]
        n, _, C = feats.shape
        g = self.grid
        merged = feats.reshape(n, g, 2, g, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, g, g, 4 * C)
        sub = merged[1:].reshape(rows, cols, g, g, 4 * C).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, 4 * C)
        tokens = torch.cat([self._rows(sub), self.glb_GN[0], self._rows(merged[0])])
        return self.img_projection(tokens)


def num_image_tokens(height: int, width: int) -> int:
    """Image tokens of a padded HD image of height x width pixels (multiples of 336)."""
    rows, cols = height // CROP, width // CROP
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


class Model(phi3.Model):
    """Phi3VForCausalLM: Phi-3 with `encode_image`; the engine merges its output at the image positions
    and runs forward(..., inputs_embeds=...)."""
    keep_float = KEEP_FLOAT

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model.vision_embed_tokens = ImageEmbedding(args)

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image: pixel_values [frames, 3, 336, 336] (global first; padding frames ignored) and the
        padded HD size (h, w) -> its image-token embeddings [n_tokens, hidden] in the model's dtype."""
        rows, cols = int(image_size[0]) // CROP, int(image_size[1]) // CROP
        tower: ImageEmbedding = self.model.vision_embed_tokens  # type: ignore[assignment]
        dtype = tower.glb_GN.dtype
        crops = pixel_values[: 1 + rows * cols].to(device=tower.glb_GN.device, dtype=dtype)
        return tower(crops, rows, cols).to(self.model.embed_tokens.weight.dtype)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """phi3's mapping, minus what the tower does not build: encoder layers past the feature layer,
    post_layernorm, CLIP's position_ids buffer, and a shared copy of the token embedding (`wte`)."""
    prefix = "model.vision_embed_tokens."
    layer_prefix = prefix + "img_processor.vision_model.encoder.layers."
    out = {}
    for name, t in phi3.sanitize(weights, args).items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(("wte.", "img_processor.vision_model.post_layernorm.")) or rest.endswith(
                    "position_ids"):
                continue
            if name.startswith(layer_prefix):
                index = name[len(layer_prefix):].split(".", 1)[0]
                if index.isdigit() and int(index) >= args.feature_layer:
                    continue
        out[name] = t
    return out
