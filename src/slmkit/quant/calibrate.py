"""Activation statistics for importance-weighted quantization (the `int4-km` recipe).

A linear's output error from quantizing weight w[n, j] grows with how large its input x_j is, so
the fit of each group's scale and min (recipe._search) weights every weight's rounding error by
E[x_j**2] over a small calibration text shipped with the package (calibration.txt: a few
paragraphs of prose, dialogue, code and numbers written for slmkit, not the text
benchmarks/quality.py scores). llama.cpp's imatrix is the same statistic, gathered offline.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")
MAX_TOKENS = 512   # the whole text (~700 tokens with most tokenizers) would add little
FLOOR = 0.01       # every input keeps this share of the mean importance: none is ignored outright


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def calibration_ids(tokenizer: Encoder, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The shipped calibration text as token ids (at most max_tokens)."""
    return tokenizer.encode(CALIBRATION_FILE.read_text(encoding="utf-8"))[:max_tokens]


@torch.no_grad()
def input_power(model: nn.Module, ids: list[int], names: Iterable[str],
                feeds: dict[str, set[str]] | None = None) -> dict[str, torch.Tensor]:
    """{linear name: mean of x**2 over the tokens, per input feature [k] float32} for the named
    nn.Linear modules of `model`, from one forward pass of `ids` (model(ids[None], last_only=True),
    the models' own signature), each over the rows it saw. A linear no token reached (an unrouted
    expert) is left out. feeds, if given, is filled with {RMSNorm name: the named linears that
    read its output tensor itself} (equalize.py folds scales into those norms)."""
    from ..models.layers import RMSNorm

    wanted = set(names)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    made: dict[int, str] = {}   # id(norm output) -> norm name
    alive: list[torch.Tensor] = []  # those outputs, kept so that no id is reused during the pass
    if feeds is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, RMSNorm):
                def out_hook(_m: nn.Module, _a: tuple, out: torch.Tensor, name: str = name) -> None:
                    made[id(out)] = name
                    alive.append(out)
                hooks.append(mod.register_forward_hook(out_hook))
    for name, mod in model.named_modules():
        if name in wanted and isinstance(mod, nn.Linear):
            def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                s = x.square().sum(0)
                sums[name] = s if name not in sums else sums[name] + s
                rows[name] = rows.get(name, 0) + x.shape[0]
                if feeds is not None and id(args[0]) in made:
                    feeds.setdefault(made[id(args[0])], set()).add(name)
            hooks.append(mod.register_forward_pre_hook(hook))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model(torch.tensor([ids], dtype=torch.long, device=device), last_only=True)
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / rows[name]).cpu() for name, s in sums.items() if rows[name] and bool(s.any())}


def importance(power: torch.Tensor) -> torch.Tensor | None:
    """Per-input weights [k] for the scale fit from input_power's statistic: E[x**2] normalised to
    mean 1, floored at FLOOR; None (a uniform fit) where the statistic is all zero or not finite."""
    if not bool(torch.isfinite(power).all()):
        return None
    mean = power.mean()
    if not mean > 0:
        return None
    return (power / mean).clamp_min(FLOOR)
