"""Activation-aware equalization for int4-km (AWQ's idea, folded into the norms): a function-
preserving rescaling done in float before quantization.

The linears that read an RMSNorm's output directly (q/k/v after input_layernorm, gate/up after the
pre-MLP norm; calibrate.input_power finds them by tensor identity) see inputs of very unequal
size: a few channels carry most of the activation power. Multiplying input channel j of every such
linear by s_j and dividing the norm's weight by s_j computes the same function, but gives the
important columns more of each int4 group's range (and flattens the inputs the kernel quantizes to
int8 per group). s = (E[x**2] / mean)**(alpha / 2); alpha per norm from ALPHAS by the smallest
output error on a sample of rows (sum_j E[x_j**2] / s_j**2 * err_ij**2); alpha 0 leaves it alone.
A norm one of whose readers is shared with another module (a tied output head) is left alone, and
the whole pass is undone unless the model's logits on a few calibration tokens stay the same.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .calibrate import importance
from .format import QuantWeight, dequantize_weight

ALPHAS = (0.0, 0.25, 0.5)
SAMPLE_ROWS = 256   # rows of each reader in the alpha search: the choice, not the result, is sampled
CHECK_TOKENS = 32
CHECK_TOL = 0.02    # relative change of the check logits that means "not the same function" (a broken
                    # fold changes them by O(1); rounding W * s to bfloat16 changes them far less)

Quantizer = Callable[[torch.Tensor, torch.Tensor | None], QuantWeight]  # (weight, importance per input)


def _scales(power: torch.Tensor, alpha: float) -> torch.Tensor:
    p = (power / power.mean()).clamp_min(1e-4)
    return p.pow(alpha / 2)


def _error(w: torch.Tensor, power: torch.Tensor, s: torch.Tensor, quantize: Quantizer) -> float:
    ws = w * s
    p = power / s.square()
    q = dequantize_weight(quantize(ws, importance(p)))
    return float(((q - ws).square() * p).sum())


@torch.no_grad()
def equalize(model: nn.Module, feeds: dict[str, set[str]], power: dict[str, torch.Tensor],
             int4: set[str], quantize: Quantizer, ids: list[int]) -> dict[str, torch.Tensor]:
    """Rescale the readers of each norm in feeds (and the norm) in place; returns the input power
    each rescaled linear now sees (power / s**2), to weight its fit. int4: the linears that will be
    int4 (the alpha search measures their error; int8 readers are rescaled alike)."""
    mods = dict(model.named_modules())
    shared = {p.data_ptr() for m in model.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check = torch.tensor([ids[:CHECK_TOKENS]], dtype=torch.long, device=device)
    before = model(check).float()
    done: list[tuple[nn.Module, list[nn.Module], torch.Tensor]] = []
    out: dict[str, torch.Tensor] = {}
    for norm_name, readers in feeds.items():
        norm, lins = mods[norm_name], [mods[r] for r in sorted(readers)]
        if "lm_head" in readers or not all(isinstance(m, nn.Linear) and m.weight.data_ptr() not in shared
                                           for m in lins):  # the head: its norm also makes hidden states
            continue
        p = power.get(sorted(readers)[0])
        scored = sorted(r for r in readers if r in int4 and r in power)
        if p is None or not scored or not bool(torch.isfinite(p).all()) or not p.mean() > 0:
            continue
        best, best_s = None, None
        for alpha in ALPHAS:
            s = _scales(p, alpha)
            err = 0.0
            for r in scored:
                w = mods[r].weight.float()
                step = max(1, w.shape[0] // SAMPLE_ROWS)
                err += _error(w[::step], power[r], s, quantize)
            if best is None or err < best:
                best, best_s = err, s
        assert best_s is not None
        if bool((best_s == 1).all()):
            continue
        _rescale(norm, lins, best_s)
        done.append((norm, lins, best_s))
        out.update({r: power[r] / best_s.square() for r in readers if r in power})
    if done:
        after = model(check).float()
        if not (after - before).norm() <= CHECK_TOL * before.norm():  # not the same function: put it back
            for norm, lins, s in done:
                _rescale(norm, lins, 1 / s)
            return {}
    return out


def _rescale(norm: nn.Module, lins: list[nn.Module], s: torch.Tensor) -> None:
    """Readers' input channels times s, the norm's (offset + weight) divided by s: new tensors, never
    a write into the old ones (they may be pages of a memory-mapped checkpoint)."""
    offset = float(getattr(norm, "offset", 0.0))
    w = norm.weight
    assert isinstance(w, torch.Tensor)
    norm.weight = nn.Parameter(((offset + w.float()) / s - offset).to(w.dtype), requires_grad=False)
    for m in lins:
        assert isinstance(m, nn.Linear)
        m.weight = nn.Parameter((m.weight.float() * s).to(m.weight.dtype), requires_grad=False)
