"""`mlx:./folder`: Apple's MLX runs the model (mlx-lm's own model classes and weight loading from a
Hugging Face folder, with mlx-lm's KV cache); our tokenizer, template and sampler
(backends/runtime.py) do the rest. On a Mac `device="gpu"` runs it on Metal; elsewhere the CPU
build (mlx-cpu) runs it on the CPU.

Where mlx-lm's Phi-3 differs from transformers', we make it match rather than accept other tokens:
- rotary embeddings come from the folder's own config through slmkit.models.rope (transformers
  v5 writes `rope_parameters`, which mlx-lm's phi3 does not read, so it would fall back to its
  defaults); LongRoPE uses the short factors up to original_max_position_embeddings and the long
  ones past it, re-running the whole sequence at the switch as transformers does (mlx-lm always
  applies the long factors);
- a sliding window mlx-lm's architecture ignores caps the context at the window (within it,
  windowed and full attention are the same).
Gemma 3 runs as mlx-lm has it (logits and greedy tokens equal native on a tiny model), except a
config whose layer_types are not mlx-lm's every-n-th-layer-global period: refused, named.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailableError, InvalidRequestError, ModelFileError, UnsupportedModelError
from .runtime import RuntimeBackend, hf_folder_info

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Rope:
    """A drop-in for mlx-lm's rope modules: mx.fast.rope with our frequency sets (`long` picks the
    LongRoPE set) and LongRoPE's attention factor applied to the rotated dims."""

    def __init__(self, mx: Any, rope: Any):
        self.mx, self.dims, self.scale = mx, rope.rotary_dim, rope.scale
        # mx.fast.rope's freqs are periods: position / freqs is the angle
        self.freqs = mx.array((1.0 / rope.inv_freq).numpy())
        self.freqs_long = None if rope.inv_freq_long is None else mx.array((1.0 / rope.inv_freq_long).numpy())
        self.long = False

    def __call__(self, x: Any, offset: Any = 0) -> Any:
        if self.scale != 1.0:
            x = x.at[..., : self.dims].multiply(self.scale)
        freqs = self.freqs_long if self.long and self.freqs_long is not None else self.freqs
        return self.mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def _phi3_ropes(mx: Any, model: Any, config: dict) -> tuple[list[_Rope], int | None]:
    """Put our rotary embeddings into each layer of an mlx-lm phi3 model; (them, the LongRoPE
    crossover length or None)."""
    from ..models.rope import build_rope

    # transformers v5 writes rope_parameters (theta, partial factor, LongRoPE's factors); v4 top-level
    # rope_theta / partial_rotary_factor and rope_scaling
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    partial = params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    rope = build_rope(head_dim=int(config["hidden_size"]) // int(config["num_attention_heads"]), theta=float(theta),
                      partial_rotary_factor=float(partial), scaling=params or None,
                      max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                      original_max_position_embeddings=config.get("original_max_position_embeddings")
                      if params.get("rope_type", params.get("type")) not in (None, "default") else None)
    ropes = []
    for layer in model.layers:
        r = _Rope(mx, rope)
        layer.self_attn.rope = r
        ropes.append(r)
    return ropes, rope.crossover


class MLXBackend(RuntimeBackend):
    provider = "mlx"
    has_full_logits = True

    def __init__(self, mx: Any, model: Any, make_cache: Any, ropes: list[_Rope], crossover: int | None,
                 *args: Any, device: Any = None, **kw: Any):
        super().__init__(*args, **kw)
        self.mx, self.model, self._make_cache, self._device = mx, model, make_cache, device
        self._ropes, self._crossover = ropes, crossover
        self._cache: Any = None
        self._seq: list[int] = []

    def _set_long(self, total: int) -> None:
        for r in self._ropes:
            r.long = self._crossover is not None and total > self._crossover

    def _forward(self, ids: Sequence[int], cache: Any) -> Any:
        # ids: [S] -> logits [S, vocab] float32 (mx array)
        with self.mx.stream(self._device):
            out = self.model(self.mx.array([list(ids)]), cache=cache)
            return out[0].astype(self.mx.float32)

    def _to_torch(self, logits: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(logits, copy=True))

    def reset(self) -> None:
        self._cache, self._seq = None, []

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self._seq = list(ids)
        self._set_long(len(self._seq))
        self._cache = self._make_cache(self.model)
        return self._to_torch(self._forward(self._seq, self._cache)[-1])

    def step(self, token: int) -> torch.Tensor:
        if len(self._seq) == self._crossover:  # crossing: the cache's keys have the short factors; all again, long
            return self.prefill([*self._seq, token])
        self._seq.append(token)
        return self._to_torch(self._forward([token], self._cache)[-1])

    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        self._set_long(len(ids))
        try:
            return self._to_torch(self._forward(ids, self._make_cache(self.model)))  # some models need one
        finally:
            self._set_long(len(self._seq))


def _check_layer_pattern(model: Any, config: dict, folder: Path) -> None:
    """mlx-lm's Gemma 3 places its full-attention layers by a period (every sliding_window_pattern-th
    layer); a config.json whose layer_types follow another order cannot run there as written."""
    pattern = getattr(getattr(model, "args", None), "sliding_window_pattern", None)
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    kinds = text.get("layer_types")
    if not isinstance(pattern, int) or not isinstance(kinds, list):
        return
    periodic = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(kinds))]
    if kinds != periodic or len(kinds) < pattern:
        raise UnsupportedModelError(f"{folder}: mlx-lm places a full-attention layer every {pattern} layers; "
                                    f"this model's layer_types are {kinds}")


def _device(mx: Any, device: str) -> Any:
    if device == "cpu":
        return mx.cpu
    if device in ("gpu", "metal", "mps"):
        if not mx.metal.is_available():
            raise BackendUnavailableError("mlx", f"device {device!r} needs Metal (Apple silicon); this machine has "
                                          "only the CPU build")
        return mx.gpu
    raise InvalidRequestError(f"must be 'cpu' or 'gpu' for the mlx backend, got {device!r}", param="device")


def open(provider: str, target: str, *, dtype: str = "auto", device: str = "cpu",  # noqa: A001 -- registry contract
         trust_remote_code: bool = False, **options: Any) -> MLXBackend:
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs mlx and mlx-lm ({e})", extra="mlx") from None
    if options:
        name = next(iter(options))
        raise InvalidRequestError(f"unknown option {name!r} for the mlx backend", param=name)
    if dtype not in DTYPES:
        raise InvalidRequestError(f"must be one of {', '.join(DTYPES)}", param="dtype")
    stream_device = _device(mx, device)
    folder = Path(target).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelFileError(folder, "is not a Hugging Face model folder (no config.json)")
    info, config, gen = hf_folder_info(folder)
    try:
        model, mlx_config = load_model(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "not supported" in str(e):
            raise UnsupportedModelError(f"{folder}: mlx-lm has no model for it ({e})") from None
        raise ModelFileError(folder, f"mlx-lm cannot load it ({e})") from None
    except (OSError, KeyError) as e:
        raise ModelFileError(folder, f"mlx-lm cannot load it ({type(e).__name__}: {e})") from None
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    _check_layer_pattern(model, config, folder)
    ropes: list[_Rope] = []
    crossover = None
    model_type = str(config.get("model_type"))
    if model_type == "phi3":
        ropes, crossover = _phi3_ropes(mx, model, config)
        window = config.get("sliding_window")
        args = getattr(model, "args", None)
        ignores_window = args is None or "sliding_window" not in {f.name for f in dataclasses.fields(args)}
        if isinstance(window, int) and 0 < window < info.context_length and ignores_window:
            info.context_length = window
    weight = next((item[1] for item in tree_flatten(model.parameters())), None)
    return MLXBackend(mx, model, make_prompt_cache, ropes, crossover, info, device=stream_device,
                      name=folder.resolve().name, model_type=model_type, generation_config=gen, path=folder,
                      format="mlx", dtype=str(getattr(weight, "dtype", "")).removeprefix("mlx.core."))

