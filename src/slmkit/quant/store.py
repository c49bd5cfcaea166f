"""Quantized model folders: what `slm quantize` writes and the HF-folder loader reads back.

A folder is a Hugging Face folder whose config.json carries
    "quantization_config": {"quant_method": "slmkit", "format": 1, "quant": "int4", "group_size": 64}
and whose model.safetensors holds float tensors under their usual names plus, for every
quantized linear, `<module>.qweight`, `<module>.scales` and (asymmetric) `<module>.mins` in the
tiled layout of format.py; the safetensors metadata key "slmkit.quant" maps each module to
{bits, group, zero, n, k}. Loading memory-maps the file: no re-quantization, no copy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError, WeightError
from ..loading.files import parse_json
from .format import BITS, CHUNK, GROUPS, SUPER_DTYPES, TILE, QuantWeight, code_vectors, padded
from .linear import QuantEmbedding, QuantLinear

FORMAT = 1
META_KEY = "slmkit.quant"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "added_tokens.json",
                    "preprocessor_config.json", "processor_config.json")  # a vision model's num_crops


def is_quantized_config(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "slmkit"


def _layout(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, int]] = {}
    seen: dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):  # a GGUF's embedding stays quantized too
            q = mod.weight_q
            meta[name] = {"bits": q.bits, "group": q.group, "zero": q.zero, "n": q.n, "k": q.k}
            for key, t in q.tensors(name).items():  # safetensors stores no shared tensors: a tied copy
                tensors[key] = t.clone() if t.data_ptr() in seen else t
                seen.setdefault(t.data_ptr(), key)
            if isinstance(mod, QuantEmbedding):
                continue
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias
            continue
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if p.data_ptr() in seen:  # a tied weight: stored once, re-tied by the model's sanitize()
                continue
            seen[p.data_ptr()] = key
            tensors[key] = p.detach()
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def save_quantized(model: nn.Module, config: dict[str, Any], dst: str | Path, *, quant: str, group_size: int | None,
                   source: str | Path | None = None, tokenizer: Any = None,
                   generation_config: dict | None = None) -> Path:
    """Write a quantized model folder at dst (which must not exist or be empty), atomically:
    everything goes into a temporary sibling that is renamed into place at the end."""
    from safetensors.torch import save_file

    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelFileError(dst, "already exists and is not an empty folder; choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        tensors, meta = _layout(model)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={META_KEY: json.dumps(meta)})
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg["quantization_config"] = {"quant_method": "slmkit", "format": FORMAT, "quant": quant,
                                      "group_size": group_size}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        src = Path(source) if source is not None else None
        if src is not None and src.is_dir():
            for fname in _TOKENIZER_FILES:
                if (src / fname).is_file():
                    shutil.copy2(src / fname, tmp / fname)
        elif tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, generation_config or {})
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_tokenizer(tok: Any, folder: Path, generation_config: dict) -> None:
    """A tokenizer built from GGUF metadata, as tokenizer.json + tokenizer_config.json."""
    tok.backend.save(str(folder / "tokenizer.json"))
    cfg: dict[str, Any] = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
                           "add_eos_token": tok.add_eos}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if generation_config:
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def _int(meta: dict, key: str, where: str, path: Path) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ModelFileError(path, f"{META_KEY} entry {where!r}: {key!r} must be a non-negative integer, got {v!r}")
    return v


def split_quantized(weights: dict[str, torch.Tensor], folder: Path) -> dict[str, QuantWeight]:
    """Take the quantized tensors out of `weights` (loaded from folder) as {"<module>.weight": QuantWeight}."""
    from safetensors import safe_open

    meta: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
        except Exception as e:  # noqa: BLE001 -- safetensors' errors are untyped: a file not in the index
            raise ModelFileError(path, f"corrupt or unreadable safetensors file ({e})") from None
        if raw:
            part = parse_json(raw, f"{path} (metadata {META_KEY!r})")
            if not isinstance(part, dict):
                raise ModelFileError(path, f"metadata {META_KEY!r} must be a JSON object")
            meta.update({k: (v, path) for k, v in part.items()})
    out: dict[str, QuantWeight] = {}
    for name, (m, path) in meta.items():
        if not isinstance(m, dict):
            raise ModelFileError(path, f"{META_KEY} entry {name!r} must be an object")
        bits, group, zero, n, k = (_int(m, key, name, path) for key in ("bits", "group", "zero", "n", "k"))
        parts = {p: weights.pop(f"{name}.{p}", None) for p in ("qweight", "scales", "mins", "super_scales",
                                                               "super_mins")}
        if parts["qweight"] is None or parts["scales"] is None:
            raise WeightError(f"{name}.qweight", "listed as quantized but missing (with its scales)", path=folder)
        if bits not in BITS or group not in GROUPS or group % CHUNK[bits] or not 0 <= zero < 1 << bits:
            raise WeightError(f"{name}.qweight", f"unsupported scheme bits={bits} group={group} zero={zero}",
                              path=folder)
        tiles, kp = padded(n, TILE) // TILE, padded(k, group)
        ng = kp // group
        sc_dtype = parts["scales"].dtype
        two_level = sc_dtype in (torch.uint8, torch.int8)
        sup = parts["super_scales"]
        n_sup = sup.shape[1] if two_level and sup is not None and sup.dim() == 3 and sup.shape[1] else 1
        want = {"qweight": ((tiles, code_vectors(bits, kp), 64), (torch.uint8,)),
                "scales": ((tiles, ng, TILE), (torch.float16, torch.float32, torch.uint8, torch.int8)),
                "mins": ((tiles, ng, TILE), (torch.uint8,) if two_level else (sc_dtype,)),
                "super_scales": ((tiles, n_sup, TILE), SUPER_DTYPES),
                "super_mins": ((tiles, n_sup, TILE), (sup.dtype,) if sup is not None else SUPER_DTYPES)}
        needed = {"qweight", "scales"} | ({"super_scales"} if two_level else set())
        if parts["mins"] is not None and two_level:
            needed.add("super_mins")
        for part, t in parts.items():
            if t is None:
                if part in needed:
                    raise WeightError(f"{name}.{part}", "missing", path=folder)
                continue
            if part.startswith("super") and not two_level:
                raise WeightError(f"{name}.{part}", f"unexpected with {sc_dtype} scales", path=folder)
            shape, dtypes = want[part]
            if tuple(t.shape) != shape or t.dtype not in dtypes or (part == "super_scales" and ng % n_sup):
                raise WeightError(f"{name}.{part}", f"has shape {tuple(t.shape)} {t.dtype}, expected {shape} "
                                  f"{' or '.join(str(d) for d in dtypes)} for n={n} k={k}", path=folder)
        out[f"{name}.weight"] = QuantWeight(bits, n, k, group, zero, parts["qweight"], parts["scales"],
                                            parts["mins"], parts["super_scales"], parts["super_mins"])
    return out
