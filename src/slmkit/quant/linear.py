"""Weight-only quantization as a module swap (gpt-fast style): model code never branches on it.

`quantize_model(model, "int4", group_size=32)` replaces every `nn.Linear` with a `QuantLinear`
holding a QuantWeight; its forward runs the compiled kernel (AVX512-VNNI or AVX2) on CPU where it is
available and takes the format, and the pure-PyTorch reference (same math) elsewhere.
`use_kernel(False)` forces the fallback.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import InvalidRequestError
from ..kernels.qgemm import get_kernel, kernel_has, qgemm_weight_args, qmatmul_kernel
from .calibrate import Encoder, calibration_ids, importance, input_power
from .equalize import equalize
from .format import GROUPS, TILE, QuantWeight, dequantize_rows, dequantize_weight, qmatmul_reference, quantize
from .recipe import KM, MIXED, TWO_LEVEL, keeps_int8, km_int8_names, quantize_mixed

SCHEMES = {"int8": 8, "int4": 4, "int4-mixed": 4, "int4-k": 4, "int4-km": 4}  # the mixed recipes: quant/recipe.py
DEFAULT_GROUP = {"int8": 32, "int4": 32, "int4-mixed": 32, "int4-k": 32, "int4-km": 32}
_kernel_enabled = True
_WEIGHT_BUFFERS = ("qweight", "scales", "mins", "super_scales", "super_mins")
EQUALIZE = True  # int4-km: fold activation-aware scales into the norms first (equalize.py)


@contextlib.contextmanager
def use_kernel(enabled: bool) -> Iterator[None]:
    """Run QuantLinear through the compiled kernel (True, where available) or the PyTorch fallback."""
    global _kernel_enabled
    old, _kernel_enabled = _kernel_enabled, enabled
    try:
        yield
    finally:
        _kernel_enabled = old


def kernel_active() -> bool:
    return _kernel_enabled and get_kernel() is not None


class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W quantized; the tensors are buffers so state_dict() saves them."""

    # the kernel's entry point for this format: where the loaded kernel variant lacks it (a format
    # with no AVX2 version, say), forward runs the PyTorch fallback
    kernel_symbol = "slm_qgemm"

    # the buffers (register_buffer below), declared so their types are known
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    super_scales: torch.Tensor | None
    super_mins: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group, self.zero = qw.bits, qw.group, qw.zero
        self.in_features, self.out_features = qw.k, qw.n
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("mins", qw.mins)
        self.register_buffer("super_scales", qw.super_scales)
        self.register_buffer("super_mins", qw.super_mins)
        self.register_buffer("bias", bias)
        self._kernel_args: tuple[tuple[torch.Tensor | None, ...], int, QuantWeight, tuple] | None = None

    def _kernel_weight(self) -> tuple[QuantWeight, tuple]:
        """weight_q and its kernel arguments, built once and rebuilt only when a buffer was replaced or
        moved (.to(), a loader swapping tensors): a decode step calls hundreds of small linears."""
        b, c = self._buffers, self._kernel_args
        if (c is None or any(b[n] is not t for n, t in zip(_WEIGHT_BUFFERS, c[0]))
                or c[1] != self.qweight.data_ptr()):
            qw = self.weight_q
            c = self._kernel_args = (tuple(b[n] for n in _WEIGHT_BUFFERS), qw.qweight.data_ptr(), qw,
                                     qgemm_weight_args(qw))
        return c[2], c[3]

    @property
    def weight_q(self) -> QuantWeight:
        return QuantWeight(self.bits, self.out_features, self.in_features, self.group, self.zero,
                           self.qweight, self.scales, self.mins, self.super_scales, self.super_mins)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight_q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        lib = get_kernel() if _kernel_enabled and x.device.type == "cpu" else None
        if lib is not None and kernel_has(lib, self.kernel_symbol):
            qw, args = self._kernel_weight()
            y = qmatmul_kernel(lib, x2, qw, x.dtype, args)
        else:
            y = qmatmul_reference(x2, self.weight_q).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = "asym" if self.mins is not None else f"zero={self.zero}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group={self.group}, {kind}, scales={str(self.scales.dtype).removeprefix('torch.')}"
                + ("" if self.super_scales is None
                   else f" x {str(self.super_scales.dtype).removeprefix('torch.')} per super-block"))


class QuantEmbedding(nn.Module):
    """An embedding table kept in its quantized form (a GGUF file's token_embd, often the very
    buffers of the tied output head's QuantLinear): a lookup dequantizes only the 16-row tiles of
    the ids asked for and only their rows to floats (format.dequantize_rows), so it equals nn.Embedding over
    dequantize_weight(qw).to(dtype) bit for bit without ever holding the float table."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    super_scales: torch.Tensor | None
    super_mins: torch.Tensor | None

    def __init__(self, qw: QuantWeight, dtype: torch.dtype):
        super().__init__()
        self.bits, self.group, self.zero, self.dtype = qw.bits, qw.group, qw.zero, dtype
        self.num_embeddings, self.embedding_dim = qw.n, qw.k
        for name in ("qweight", "scales", "mins", "super_scales", "super_mins"):
            self.register_buffer(name, getattr(qw, name))

    @property
    def weight_q(self) -> QuantWeight:
        return QuantWeight(self.bits, self.num_embeddings, self.embedding_dim, self.group, self.zero,
                           self.qweight, self.scales, self.mins, self.super_scales, self.super_mins)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 1:
            return self._one(ids)
        flat = ids.reshape(-1).long()
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        return dequantize_rows(self.weight_q, flat, self.dtype).view(*ids.shape, self.embedding_dim)

    def _one(self, ids: torch.Tensor) -> torch.Tensor:
        """One id (a decode step's token): its tile as views of the buffers, no unique / index_select
        (the same tile through the same dequantize_weight, so the same bits)."""
        i = int(ids.reshape(-1)[0])
        if not 0 <= i < self.num_embeddings:
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        t = i // TILE
        qw = self.weight_q
        parts = [None if x is None else x[t:t + 1]
                 for x in (qw.qweight, qw.scales, qw.mins, qw.super_scales, qw.super_mins)]
        sub = QuantWeight(qw.bits, TILE, qw.k, qw.group, qw.zero, *parts)  # type: ignore[arg-type]
        return dequantize_weight(sub, torch.float32)[i % TILE].to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} (quantized table), {self.dtype}"


def check_scheme(quant: str, group_size: int | None) -> tuple[int, int]:
    """(bits, group) for a scheme name, or InvalidRequestError naming the bad parameter."""
    if quant not in SCHEMES:
        raise InvalidRequestError(f"must be one of {', '.join(SCHEMES)}; got {quant!r}", param="quant")
    group = DEFAULT_GROUP[quant] if group_size is None else group_size
    if isinstance(group, bool) or group not in GROUPS or group < 32:
        raise InvalidRequestError(f"must be one of 32, 64, 128, 256; got {group_size!r}", param="group_size")
    return SCHEMES[quant], group


def quantize_model(model: nn.Module, quant: str, group_size: int | None = None,
                   skip: Callable[[str], bool] | None = None,
                   release: Callable[[torch.Tensor], None] | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> int:
    """Swap every float nn.Linear of `model` (except names where skip(name) is true) for a
    QuantLinear; returns how many. Each float weight is dropped as soon as its copy is made
    (`release(weight)` is called for weights no other module shares, e.g. to unmap file pages).
    weights: per linear name, the importance of each input in the two-level fit (int4-k, int4-km)."""
    from ..models import keep_float_modules

    bits, group = check_scheme(quant, group_size)
    keep = keep_float_modules(model)  # a vision tower stays float
    todo = [(f"{pname}.{name}" if pname else name, parent, name, child)
            for pname, parent in model.named_modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.weight.is_floating_point() and id(child) not in keep]
    shared = {p.data_ptr() for m in model.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)}  # a tied embedding keeps reading its weight
    n = 0
    for full, parent, name, lin in todo:
        if skip is not None and skip(full):
            continue
        bias = None if lin.bias is None else lin.bias.detach().clone()
        w = lin.weight.detach().float() if lin.weight.dtype != torch.float32 else lin.weight.detach()
        if quant in (TWO_LEVEL, KM):
            q = quantize_mixed(w, group, weights=None if weights is None else weights.get(full))
        else:
            q = quantize(w, bits, group)
        setattr(parent, name, QuantLinear(q, bias))
        if release is not None and lin.weight.data_ptr() not in shared:
            release(lin.weight)
        n += 1
    return n


def apply_quant(model: nn.Module, quant: str | None, group_size: int | None = None,
                release: Callable[[torch.Tensor], None] | None = None, tokenizer: Encoder | None = None) -> int:
    """The `load(quant=...)` pass over a model's remaining float linears. int4 keeps the output
    projection (lm_head) at int8, as llama.cpp's Q4 files keep theirs at Q6_K: its errors go
    straight into the logits. int4-mixed and int4-k (quant/recipe.py) also keep k_proj / v_proj at
    int8; int4-k stores the rest's scales in two levels. int4-km also keeps down_proj int8 in
    Q4_K_M's more-bits layers and, given the model's tokenizer, weights the two-level fit by each
    input's mean square over the shipped calibration text (one forward pass of the float model;
    without a tokenizer the fit is unweighted)."""
    if quant in (None, "none", "auto"):
        return 0
    _, group = check_scheme(quant, group_size)
    n = 0
    weights = None
    if quant == "int4":
        n += quantize_model(model, "int8", None, skip=lambda name: name != "lm_head", release=release)
    elif quant in (MIXED, TWO_LEVEL):
        n += quantize_model(model, "int8", None, skip=lambda name: not keeps_int8(name), release=release)
    elif quant == KM:
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_floating_point()]
        int8 = km_int8_names(names)
        todo = [name for name in names if name not in int8]
        if tokenizer is not None and todo:  # before anything is quantized: the float model's activations
            ids = calibration_ids(tokenizer)
            feeds: dict[str, set[str]] = {}
            power = input_power(model, ids, names, feeds)
            if EQUALIZE:
                power.update(equalize(model, feeds, power, set(todo), ids=ids,
                                      quantize=lambda w, imp: quantize_mixed(w, group, weights=imp)))
            weights = {name: imp for name, p in power.items() if name in todo and (imp := importance(p)) is not None}
        n += quantize_model(model, "int8", None, skip=lambda name: name not in int8, release=release)
    return n + quantize_model(model, quant, group_size, release=release, weights=weights)
