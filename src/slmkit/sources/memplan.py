"""The memory plan: will this model, at this precision, context and number of parallel slots, fit
this machine — decided before any download or load.

Numbers (all bytes; GiB = 2**30):
  weights   = parameters x bits/8 at the chosen precision (bf16/fp16 16 bits, int8 8.5 and int4 4.5:
              one fp16 scale per 32 weights; GGUF q4_k_m 4.85, q8_0 8.5), or, with no --quant, the
              files' own size (a local folder / GGUF) or the variant's bits (a catalog entry).
              The vision tower and the MoE experts are part of it and reported on their own lines.
  kv        = 2 (K and V) x layers x kv_heads x head_dim x 2 bytes (bf16 cache) per token, x ctx x parallel.
  images    = images x tokens_per_image x hidden x 4 bytes x parallel (the projected image features
              held in fp32 until prefill); the image tokens also take room in ctx.
  paged     = MoE experts used as stored (no --quant): memory-mapped, so only the experts_per_token of
              n_experts per layer need be resident; (1 - k/E) of their bytes are left out of the total.
  total     = weights - paged + kv + images; it fits when total + 512 MiB (runtime headroom) <= available.
available is MemAvailable capped by the cgroup limit (v2 memory.max, v1 memory.limit_in_bytes);
with a GPU (torch.cuda), its free memory is reported too and decides for --device cuda.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MemoryPlanError, ModelFileError

HEADROOM_BYTES = 512 * 2**20  # as the batch engine keeps free: activations, tokenizer, server
KV_VALUE_BYTES = 2  # bf16 / fp16 cache
QUANT_BITS = {"fp32": 32.0, "float32": 32.0, "bf16": 16.0, "bfloat16": 16.0, "fp16": 16.0, "float16": 16.0,
              "f16": 16.0, "int8": 8.5, "q8_0": 8.5, "int4": 4.5, "q4_0": 4.5, "q4_k_m": 4.85,
              "int4-mixed": 5.2, "int4-k": 5.0, "int4-km": 5.4}  # linears of a GQA model (k/v at int8): quant/recipe.py
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Shape:
    """What the plan needs to know about a model, without its weights."""

    name: str
    params: int
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    context: int
    stored_bits: float  # precision of the weights as they come
    stored_bytes: int | None = None  # their size on disk, where known (files): used as-is without --quant
    vision_params: int = 0
    tokens_per_image: int = 0
    expert_params: int = 0
    n_experts: int = 0  # MoE: experts per layer, and how many each token uses
    experts_per_token: int = 0

    @property
    def kv_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_VALUE_BYTES


@dataclass
class MemoryPlan:
    model: str
    precision: str
    ctx: int
    parallel: int
    images: int
    params: int
    weights_bytes: int
    vision_bytes: int
    expert_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    image_tokens: int
    image_bytes: int
    total_bytes: int
    available_bytes: int | None
    gpu_available_bytes: int | None
    device: str
    headroom_bytes: int | None
    fits: bool
    advice: list[str]
    paged_bytes: int = 0  # MoE experts used as stored: memory-mapped, paged in from disk when chosen (not in total)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self) -> str:
        g = _gib
        parts = [f"{self.model} at {self.precision}: weights {g(self.weights_bytes)}"]
        if self.vision_bytes:
            parts.append(f"(vision tower {g(self.vision_bytes)})")
        if self.expert_bytes and self.paged_bytes:
            parts.append(f"(MoE experts {g(self.expert_bytes)} memory-mapped: {g(self.paged_bytes)} of them need not "
                         f"stay resident, paged in from disk when chosen)")
        elif self.expert_bytes:
            parts.append(f"(MoE experts {g(self.expert_bytes)}, all resident)")
        parts.append(f"+ KV {g(self.kv_bytes)} ({self.ctx} tokens x {self.parallel} slot(s), "
                     f"{_gib(self.kv_bytes_per_token)}/token)")
        if self.images:
            parts.append(f"+ {self.images} image(s) {g(self.image_bytes)} "
                         f"({self.image_tokens} image tokens per request)")
        head = " ".join(parts) + f" = {g(self.total_bytes)}"
        if self.available_bytes is None:
            return head + f"; available {self.device} memory unknown"
        head += f"; {g(self.available_bytes)} available ({self.device})"
        if self.fits:
            return head + f": fits, {g(self.headroom_bytes or 0)} to spare"
        return head + ": does not fit. " + ("; ".join(self.advice) if self.advice else "")


def _gib(n: int) -> str:
    """Bytes in binary units: GiB, or MiB / KiB for small models."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale or unit == "KiB":
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------ shapes
def shape_from_catalog(spec: str) -> tuple[Shape, str]:
    """The catalog's numbers for a name (and tag); returns the shape and its variant's precision name."""
    from .catalog import lookup

    entry, variant = lookup(spec)
    a, v, m = entry.arch, entry.vision or {}, entry.moe or {}
    return Shape(name=spec, params=entry.params, layers=a["layers"], kv_heads=a["kv_heads"], head_dim=a["head_dim"],
                 hidden=a["hidden"], context=entry.context, stored_bits=variant.bits,
                 vision_params=int(v.get("params", 0)), tokens_per_image=int(v.get("tokens_per_image", 0)),
                 expert_params=int(m.get("expert_params", 0))), variant.quant


def _safetensors_params(path: Path) -> int:
    """Parameters in one .safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelFileError(path, "too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ModelFileError(path, f"safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelFileError(path, "safetensors header is not JSON") from None
    total = 0
    for name, t in header.items():
        if name == "__metadata__" or not isinstance(t, dict):
            continue
        count = 1
        for d in t.get("shape", []):
            count *= int(d)
        total += count
    return total


def shape_from_folder(folder: Path) -> tuple[Shape, str]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(folder / "config.json", f"cannot read the model config ({type(e).__name__})") from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(folder, "has no *.safetensors files to plan from")
    heads = int(text.get("num_attention_heads", 1))
    hidden = int(text.get("hidden_size", 0))
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    precision = str(q.get("quant") or q.get("bits") and f"int{q['bits']}" or cfg.get("torch_dtype") or "bf16")
    vision = cfg.get("model_type") == "phi3_v"
    shape = Shape(name=str(folder), params=sum(_safetensors_params(p) for p in files),
                  layers=int(text["num_hidden_layers"]), kv_heads=int(text.get("num_key_value_heads") or heads),
                  head_dim=int(text.get("head_dim") or hidden // max(1, heads)), hidden=hidden,
                  context=int(text.get("max_position_embeddings", 4096)), stored_bits=QUANT_BITS.get(precision, 16.0),
                  stored_bytes=sum(p.stat().st_size for p in files),
                  tokens_per_image=757 if vision else 0)
    n_experts = int(text.get("num_local_experts") or 0)
    if n_experts:  # Mixtral-style MoE (Phi-3.5-MoE): 3 matrices per expert
        shape.n_experts, shape.experts_per_token = n_experts, int(text.get("num_experts_per_tok") or 2)
        shape.expert_params = shape.layers * n_experts * 3 * hidden * int(text.get("intermediate_size", 0))
    return shape, precision


def shape_from_gguf(path: Path) -> tuple[Shape, str]:
    from ..gguf.reader import open_gguf

    with open_gguf(path, lazy_strings=True) as f:
        meta, arch = f.metadata, f.architecture
        params = sum(t.n_elements for t in f.tensors.values())
        types = sorted({t.type_name for t in f.tensors.values()})

    def key(k: str, default: int | None = None) -> int:
        v = meta.get(f"{arch}.{k}", default)
        if v is None:
            raise ModelFileError(path, f"GGUF metadata {arch}.{k} is missing")
        return int(v)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    size = path.stat().st_size
    shape = Shape(name=str(path), params=params, layers=key("block_count"),
                  kv_heads=key("attention.head_count_kv", heads), head_dim=key("attention.key_length", hidden // heads),
                  hidden=hidden, context=key("context_length", 4096), stored_bits=size * 8 / max(1, params),
                  stored_bytes=size)
    return shape, "/".join(types)


def shape_for(model: str | Path) -> tuple[Shape, str]:
    """A local folder or GGUF file (config and sizes only), else a catalog name."""
    import stat

    from ..loading.files import expand_user, stat_path

    path = expand_user(model)
    st = stat_path(path)  # a name the OS refuses is a ModelFileError, not an OSError
    if st is not None and stat.S_ISDIR(st.st_mode):
        return shape_from_folder(path)
    if st is not None and stat.S_ISREG(st.st_mode):
        return shape_from_gguf(path)
    if st is not None:
        raise ModelFileError(path, "is neither a model folder nor a file (a FIFO, socket or device)")
    from .catalog import is_catalog_name
    from .store import find

    found = None if is_catalog_name(str(model)) else find(str(model))  # an imported or Ollama-pulled name
    if found is not None:
        return shape_for(found["path"])
    return shape_from_catalog(str(model))


# ------------------------------------------------------------------ the plan
def _gpu_free() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # a broken driver is no reason to fail a plan
        return None
    return None


def make_plan(shape: Shape, precision: str, *, quant: str | None = None, ctx: int | None = None,
              parallel: int = 1, images: int = 0, device: str = "cpu", available: int | None = None,
              gpu_available: int | None = None, probe: bool = True, flags: dict[str, str] | None = None) -> MemoryPlan:
    """The plan for a shape. available / gpu_available: bytes (None with probe=True: read this machine).
    flags: the command's own names for quant / ctx / parallel in the advice (slm serve: --slot-context, --slots)."""
    from ..loading.memory import available_bytes

    if quant not in (None, "none") and quant not in QUANT_BITS:
        raise MemoryPlanError(f"unknown precision {quant!r}; one of {', '.join(QUANT_BITS)}", needed=0, available=0)
    ctx = int(ctx or min(shape.context, 4096))
    if probe:
        available = available if available is not None else available_bytes()
        gpu_available = gpu_available if gpu_available is not None else _gpu_free()
    bits = QUANT_BITS[quant] if quant not in (None, "none") else shape.stored_bits
    precision = quant if quant not in (None, "none") else precision
    if quant in (None, "none") and shape.stored_bytes is not None:
        weights = shape.stored_bytes
    else:
        weights = int(shape.params * bits / 8)
    paged = 0
    if quant in (None, "none") and shape.stored_bytes is not None and shape.n_experts:
        # used as stored, the experts stay memory-mapped: only the chosen ones need to be resident
        cold = 1 - shape.experts_per_token / shape.n_experts
        per_param = shape.stored_bytes / max(1, shape.params)  # the files' own bytes per weight
        paged = int(shape.expert_params * per_param * cold)
    per_token = shape.kv_per_token
    kv = per_token * ctx * parallel
    image_tokens = images * shape.tokens_per_image
    image_bytes = image_tokens * shape.hidden * 4 * parallel
    total = weights - paged + kv + image_bytes  # what must be resident
    room = gpu_available if device.startswith("cuda") else available
    fits = room is None or total + HEADROOM_BYTES <= room
    advice: list[str] = []
    names = {"quant": "--quant", "ctx": "--ctx", "parallel": "--parallel", **(flags or {})}
    if image_tokens and image_tokens >= ctx:
        fits = False
        advice.append(f"{images} image(s) take {image_tokens} tokens: raise {names['ctx']} above that")
    if room is not None and not fits and total + HEADROOM_BYTES > room:
        advice += _advice(shape, bits, weights, per_token, ctx, parallel, image_bytes, room - HEADROOM_BYTES, names)
    return MemoryPlan(model=shape.name, precision=precision, ctx=ctx, parallel=parallel, images=images,
                      params=shape.params, weights_bytes=weights, vision_bytes=int(shape.vision_params * bits / 8),
                      expert_bytes=int(shape.expert_params * bits / 8), kv_bytes_per_token=per_token, kv_bytes=kv,
                      image_tokens=image_tokens, image_bytes=image_bytes, total_bytes=total, available_bytes=available,
                      gpu_available_bytes=gpu_available, device=device,
                      headroom_bytes=None if room is None else room - total, fits=fits, advice=advice,
                      paged_bytes=paged)


def _advice(shape: Shape, bits: float, weights: int, per_token: int, ctx: int, parallel: int, image_bytes: int,
            room: int, names: dict[str, str]) -> list[str]:
    """What to change so the plan fits `room` bytes: a smaller quant, a shorter context, fewer slots."""
    out = []
    for q in ("int8", "int4"):
        w = int(shape.params * QUANT_BITS[q] / 8)
        if QUANT_BITS[q] < bits and w + per_token * ctx * parallel + image_bytes <= room:
            out.append(f"use {names['quant']} {q} (weights {_gib(w)})")
            break
    left = room - weights - image_bytes
    if left > 0 and left // (per_token * parallel) >= 256:
        out.append(f"use {names['ctx']} {int(left // (per_token * parallel))} or less")
    if parallel > 1 and left > 0 and left // (per_token * ctx) >= 1:
        out.append(f"use {names['parallel']} {int(left // (per_token * ctx))}")
    if not out:
        w4 = int(shape.params * QUANT_BITS["int4"] / 8)
        out.append(f"this machine cannot hold it: even at int4 the weights take {_gib(w4)} of {_gib(max(0, room))}"
                   " usable")
    return out


def plan(model: str | Path, *, quant: str | None = None, ctx: int | None = None, parallel: int = 1,
         images: int = 0, device: str = "cpu", flags: dict[str, str] | None = None) -> MemoryPlan:
    shape, precision = shape_for(model)
    return make_plan(shape, precision, quant=quant, ctx=ctx, parallel=parallel, images=images, device=device,
                     flags=flags)


def check(p: MemoryPlan) -> MemoryPlan:
    """Raise MemoryPlanError with the plan's message when it does not fit."""
    if not p.fits:
        raise MemoryPlanError(p.message(), needed=p.total_bytes + HEADROOM_BYTES, available=p.available_bytes or 0)
    return p
