"""Load a Hugging Face folder: config.json, safetensors (sharded or not, memory-mapped), tokenizer.

Every failure is a typed error naming the file, field or tensor at fault.
"""
from __future__ import annotations

import math
import re
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InvalidRequestError, MemoryPlanError, ModelFileError, WeightError
from ..models import get_model_module
from ..models.base import short_repr
from ..text.tokenizer import Tokenizer
from .files import expand_user, read_json, stat_path
from .memory import FileMappings, release_pages

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmul runs in hardware (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" picks the fastest: bf16 on AMX / AVX512-BF16 CPUs (~6x fp32 GEMM, half the bytes
    per decoded token) and on CUDA with bf16 support, fp16 on other GPUs, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"must be one of auto, {', '.join(DTYPES)}; got {dtype!r}", param="dtype")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or InvalidRequestError naming what is wrong."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(f"not a device: {device!r} ({e})", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("CUDA was asked for but this torch build or machine has no CUDA device",
                                  param="device")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidRequestError(f"unsupported device type {dev.type!r}", param="device")
    return dev


def _weight_files(folder: Path) -> dict[str, list[str] | None]:
    """{file name: expected tensor names (from the index) or None (take what the file has)}."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelFileError(index, "has no 'weight_map' object")
        files: dict[str, list[str] | None] = {}
        for name, fname in wmap.items():
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise ModelFileError(index, f"weight_map entry for {name!r} is not a plain file name: {fname!r}")
            files.setdefault(fname, []).append(name)  # type: ignore[union-attr]
        return files
    single = sorted(p.name for p in folder.glob("*.safetensors"))
    if not single:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {other[0]}: PyTorch pickles are not loaded; convert to safetensors)" if other else ""
        raise ModelFileError(folder, f"no *.safetensors weights{hint}")
    return {name: None for name in single}


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder, memory-mapped (no copy until a dtype change needs one)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for fname, expected in _weight_files(folder).items():
        path = folder / fname
        if not path.is_file():
            raise ModelFileError(path, "weight shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for name in expected or names:
                    if name not in names:
                        raise WeightError(name, "listed in the index but not in the shard", path=path)
                    out[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise ModelFileError(path, f"corrupt or truncated safetensors file ({e})") from None
        except (OSError, RuntimeError) as e:  # mmap failures, unknown dtypes
            raise ModelFileError(path, f"cannot read tensors ({e})") from None
    return out


class _SkipInit(torch.overrides.TorchFunctionMode):
    """While a model is built on the meta device: torch.nn.init's in-place initialisers return their
    tensor untouched (a meta tensor holds no values; the load assigns every weight). The meta device's
    normal_ (nn.Embedding's init) imported torch._dynamo, ~2 s of a load, used nowhere else. A
    TorchFunctionMode is per thread: other threads' initialisation is unaffected."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build_model(module: Any, args: Any, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, source: object, quantized: dict[str, Any] | None = None) -> nn.Module:
    """Construct on the meta device, check every tensor, then assign (no random init, no copy).
    `quantized` maps linear weight names ("....weight") to QuantWeights: those modules become
    QuantLinear (slmkit.quant) instead of taking a float tensor."""
    weights = module.sanitize(weights, args)
    with torch.device("meta"), _SkipInit():
        model = module.Model(args)
    quant_state = _swap_quantized(model, quantized or {}, source, dtype) if quantized else {}
    for name in quantized or {}:
        weights.pop(name, None)  # a tied float copy (the embedding's) may have been added by sanitize
    expected = {k: v for k, v in model.state_dict().items() if k not in quant_state}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise WeightError(missing[0], f"missing from the checkpoint ({len(missing)} missing in all)", path=source)
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        raise WeightError(unexpected[0], f"not part of a {args.model_type} model ({len(unexpected)} unexpected)",
                          path=source)
    state = {}
    maps = FileMappings()
    uses = Counter(id(w) for w in weights.values())  # tied weights appear under two names
    for name, ref in expected.items():
        t = weights[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightError(name, f"has shape {tuple(t.shape)}, config implies {tuple(ref.shape)}", path=source)
        if not (t.is_floating_point()):
            raise WeightError(name, f"has non-float dtype {t.dtype}", path=source)
        keep32 = t.dim() == 1 and getattr(module, "NORMS_IN_FLOAT32", False)  # used in fp32 anyway
        state[name] = t.to(device=device, dtype=torch.float32 if keep32 else dtype)
        if state[name].data_ptr() != t.data_ptr() and uses[id(t)] == 1:
            release_pages(t, maps)  # converted copy made: let the mapped checkpoint pages go
    state.update(quant_state)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def _swap_quantized(model: nn.Module, quantized: dict[str, Any], source: object,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Replace the (meta) nn.Linear of every quantized weight name (an nn.Embedding: a QuantEmbedding
    giving dtype rows); returns the new modules' state."""
    from ..quant.linear import QuantEmbedding, QuantLinear

    state: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        lin = getattr(parent, attr, None) if parent is not None else None
        if isinstance(lin, nn.Embedding) and (qw.n, qw.k) == (lin.num_embeddings, lin.embedding_dim):
            emb = QuantEmbedding(qw, dtype)
            setattr(parent, attr, emb)
            state.update({f"{path}.{k}": v for k, v in emb.state_dict().items()})
            continue
        if not isinstance(lin, nn.Linear):
            raise WeightError(name, "is quantized but is not a linear layer's weight of this model", path=source)
        if (qw.n, qw.k) != (lin.out_features, lin.in_features):
            raise WeightError(name, f"has shape {(qw.n, qw.k)}, config implies {(lin.out_features, lin.in_features)}",
                              path=source)
        # a bias (Phi-3.5-MoE's lm_head) stays float: a meta placeholder here, the checkpoint's
        # tensor assigned with the rest of the float state
        q = QuantLinear(qw, None if lin.bias is None else torch.empty(qw.n, device="meta"))
        setattr(parent, attr, q)
        state.update({f"{path}.{k}": v for k, v in q.state_dict().items() if k != "bias"})
    return state


@dataclass
class LoadedModel:
    model: nn.Module
    args: Any
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    name: str
    generation_config: dict = field(default_factory=dict)
    gguf: Any = None  # the open GGUFFile a model came from (its quantized blocks stay reachable)
    config: dict = field(default_factory=dict)  # HF-style config (what `slm quantize` writes out)


def load_hf_folder(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
                   quant: str | None = None, group_size: int | None = None) -> LoadedModel:
    """quant "int8" / "int4" quantizes the float linear weights after load; a folder written by
    `slm quantize` loads its quantized tensors as they are (memory-mapped, no re-quantization)."""
    from ..quant.linear import apply_quant
    from ..quant.store import is_quantized_config, split_quantized

    folder = expand_user(path)
    st = stat_path(folder)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise ModelFileError(folder, "is not a model folder (no such directory)")
    config_path = folder / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ModelFileError(config_path, "must hold a JSON object")
    module = get_model_module(config.get("model_type"))
    dev = parse_device(device)
    dt = resolve_dtype(dtype, dev)
    weights = load_safetensors(folder)  # memory-mapped: only the headers are read here
    quantized = split_quantized(weights, folder) if is_quantized_config(config) else {}
    shapes = {k: tuple(v.shape) for k, v in weights.items()} | {k: (q.n, q.k) for k, q in quantized.items()}
    check_config_sizes(config, shapes, config_path)  # before ModelArgs builds anything from those sizes
    args = module.ModelArgs.from_dict(config, path=config_path)
    check_ram(module, args, weights, dt, quant if not quantized else None, folder)
    model = build_model(module, args, weights, dt, dev, folder, quantized=quantized)
    maps = FileMappings()
    tokenizer = Tokenizer.from_folder(folder)
    apply_quant(model, quant, group_size, release=lambda t: release_pages(t, maps), tokenizer=tokenizer)
    check_chat_template(tokenizer, "chat_template", folder)
    gen_path = folder / "generation_config.json"
    gen_cfg = check_generation_config(read_json(gen_path, required=False) or {}, gen_path)
    return LoadedModel(model, args, tokenizer, dt, dev, folder.resolve().name, gen_cfg, config=config)


# Sizes a config gives that a model is built from; each is at most some dimension of some weight.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads",
               "num_key_value_heads")
_LAYER = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")  # HF names, as the models' sanitize() takes them


def check_config_sizes(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], source: object, *,
                       layers: set[int] | None = None, keys: Mapping[str, str] | None = None) -> None:
    """Check the counts and sizes of a config against the tensors actually present, before anything
    is allocated from them: ModelArgs computes RoPE tables from head_dim (2**31 would take 8 GiB) and
    the model gets num_hidden_layers layers (10**5 took minutes and GBs to fail). Exact shapes are
    checked later (build_model); here each size must fit some tensor dimension and the layer count
    must equal the layers the weights hold. `layers`: the layer indices found (default: from HF
    names); `keys` renames fields for errors (a GGUF file's metadata keys)."""
    keys = keys or {}
    largest = max((int(d) for s in shapes.values() for d in s), default=0)
    for name in SIZE_FIELDS:
        v = config.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > largest:
            raise ConfigError(keys.get(name, name), f"is {v}, larger than every dimension of the weights (largest "
                              f"{largest}): the config does not match the checkpoint", path=source)
    n = config.get("num_hidden_layers")
    if isinstance(n, int) and not isinstance(n, bool):
        if layers is None:
            layers = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
        if len(layers) != n or (layers and max(layers) != n - 1):
            held = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
            raise ConfigError(keys.get("num_hidden_layers", "num_hidden_layers"),
                              f"says {n} layers but the weights hold {len(layers)} ({held})", path=source)


def check_generation_config(cfg: Any, source: object) -> dict:
    """generation_config.json's sampling defaults, checked at load: they apply to every request that
    leaves them out, so a bad one ("temperature": "hot") would break each of them instead. Keys set to
    null are dropped (as if absent)."""
    if not isinstance(cfg, dict):
        raise ModelFileError(source, "must hold a JSON object")
    cfg = {k: v for k, v in cfg.items() if v is not None}

    def number(v: Any) -> bool:  # (an int is finite: math.isfinite would overflow on a huge one)
        return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)))

    rules = {"do_sample": (lambda v: isinstance(v, bool), "must be true or false"),
             "temperature": (lambda v: number(v) and 0 <= v <= 100, "must be a number in [0, 100]"),
             "top_p": (lambda v: number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
             "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                       "must be an integer >= 0"),
             "eos_token_id": (lambda v: _token_ids(v), "must be a token id or a list of token ids")}
    for key, (ok, why) in rules.items():
        if key in cfg and not ok(cfg[key]):
            raise ConfigError(key, f"{why}, got {short_repr(cfg[key])}", path=source)
    return cfg


def _token_ids(v: Any) -> bool:
    ids = v if isinstance(v, list) else [v]
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)


def check_chat_template(tokenizer: Tokenizer, field: str, source: object) -> None:
    """Render a one-message conversation with the model's chat template now, so a template that
    cannot work (a syntax error, a division by zero) fails the load naming itself, rather than every
    chat request later. Models without a template use a built-in one and are not checked."""
    from ..text.chat import render_prompt

    if tokenizer.chat_template is None:
        return
    try:
        render_prompt([{"role": "user", "content": "Hello"}], tokenizer.chat_template,
                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    except InvalidRequestError as e:
        why = e.__cause__ if e.__cause__ is not None else e
        raise ConfigError(field, f"the chat template cannot render a one-message conversation "
                          f"({type(why).__name__}: {why})", path=source) from None


def check_ram(module: Any, args: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
              quant: str | None, source: object) -> None:
    """Before anything is read: a load whose weights must be copied into memory (a dtype change,
    or quantizing at load) and cannot fit says so with the numbers. Weights used as stored stay
    memory-mapped (the OS pages them in and may drop them), so those loads go ahead on any RAM."""
    from .memory import available_bytes, ram_by_precision

    precision = quant if quant in ("int8", "int4") else str(dtype).removeprefix("torch.")
    copies = quant in ("int8", "int4") or any(t.dtype != dtype for t in weights.values() if t.dim() >= 2)
    avail = available_bytes()
    if not copies or avail is None:
        return
    with torch.device("meta"), _SkipInit():
        plan = ram_by_precision(module.Model(args))
    need = plan.get(precision, plan["float32"])
    if need > avail:
        fits = [p for p, b in plan.items() if b <= avail]
        raise MemoryPlanError(
            f"{source}: the weights need {need / 2**30:.2f} GiB in memory at {precision} but "
            f"{avail / 2**30:.2f} GiB is available ("
            + ", ".join(f"{p} {b / 2**30:.2f} GiB" for p, b in plan.items())
            + (f"; {', '.join(fits)} would fit" if fits else "") + ")", needed=need, available=avail)
