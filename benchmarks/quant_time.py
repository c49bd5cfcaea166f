"""How long `slm quantize` takes for Phi-3-mini (3.8B), estimated from one decoder layer's tensors
at Phi-3-mini shapes (random bf16 weights) times 32 layers, plus the int8 output head.

    .venv/bin/python benchmarks/quant_time.py [--quants int4,int4-mixed,int4-k,int4-km] [--quick]

int4-km: down_proj is int8 in Q4_K_M's more-bits layers (16 of 32) and int4-k elsewhere, so its
layer time counts down_proj that share of each; the fit is weighted by calibration statistics,
which cost one float forward pass of 512 tokens: estimated as that many rows through every
linear (bfloat16 matmuls; attention and the rest are small beside them at 512 tokens), plus the
equalization's search (three fits of 256 rows of each norm-fed linear per layer).
--quick times the first 1024 rows of each tensor (full K) and scales by its row count: the
quantizers work through rows in chunks, so time grows with rows; a fraction of the work for an
estimate at Phi-3-mini's shapes.
Prints a table, writes results/quant_time.json. Run on an idle machine (2 threads, as the others).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402

LAYERS = 32
# Phi-3-mini: hidden 3072, intermediate 8192, 32 heads, vocab 32064; qkv and gate_up are fused
LAYER_SHAPES = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
                "down_proj": (3072, 8192)}
HEAD = (32064, 3072)
CALIB_TOKENS = 512


def time_one(quant: str, name: str, shape: tuple[int, int], rows: int | None = None) -> float:
    """Seconds to quantize a weight of `shape` (timing its first `rows` rows and scaling)."""
    from slmkit.quant.format import quantize
    from slmkit.quant.recipe import KM, MIXED, TWO_LEVEL, keeps_int8, quantize_mixed

    n = shape[0] if rows is None else min(rows, shape[0])
    w = (torch.randn(n, shape[1]) * 0.02).to(torch.bfloat16)
    imp = torch.rand(shape[1]) + 0.1  # stands in for calibrate.importance: the same work
    t = time.perf_counter()
    wf = w.float()
    if name == "lm_head" or (quant in (MIXED, TWO_LEVEL, KM) and keeps_int8(name)) or quant == "int8":
        quantize(wf, 8, 32)
    elif quant in (TWO_LEVEL, KM):
        quantize_mixed(wf, 32, weights=imp if quant == KM else None)
    else:
        quantize(wf, 4, 32)
    return (time.perf_counter() - t) * shape[0] / n


def calibration_time(rows: int | None) -> float:
    """One forward pass of CALIB_TOKENS tokens through every linear of the model (bf16)."""
    total = 0.0
    for name, (n, k) in [*LAYER_SHAPES.items(), ("lm_head", HEAD)]:
        m = n if rows is None else min(rows, n)
        w = torch.randn(m, k, dtype=torch.bfloat16)
        x = torch.randn(CALIB_TOKENS, k, dtype=torch.bfloat16)
        t = time.perf_counter()
        x.float().square().sum(0)
        x @ w.t()
        total += (time.perf_counter() - t) * n / m * (1 if name == "lm_head" else LAYERS)
    return total


def main() -> None:
    from slmkit.quant.recipe import KM, more_bits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="int4,int4-mixed,int4-k,int4-km")
    ap.add_argument("--quick", action="store_true", help="time 1024 rows of each tensor and scale")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows_ = 1024 if a.quick else None
    share = sum(more_bits(i, LAYERS) for i in range(LAYERS)) / LAYERS  # int4-km's int8 down_proj layers
    rows = []
    for quant in a.quants.split(","):
        per = {name: time_one(quant, name, (n, k), rows_) for name, (n, k) in LAYER_SHAPES.items()}
        calib = 0.0
        if quant == KM:
            n, k = LAYER_SHAPES["down_proj"]
            per["down_proj"] = share * time_one("int8", "down_proj", (n, k), rows_) + (1 - share) * per["down_proj"]
            calib = calibration_time(rows_)
            # equalize.py's alpha search: 3 fits of 256 sampled rows of each norm-fed linear
            fed = ("qkv_proj", "gate_up_proj")
            calib += LAYERS * 3 * sum(time_one(KM, name, (256, LAYER_SHAPES[name][1])) for name in fed)
        head = time_one(quant, "lm_head", HEAD, rows_)
        total = LAYERS * sum(per.values()) + head + calib
        rows.append({"quant": quant, "layer_s": sum(per.values()), "head_s": head, "calibration_s": calib,
                     "estimate_s": total, **{f"{k}_s": v for k, v in per.items()}})
        print(f"  {quant}: {rows[-1]}", flush=True)
    print_table(rows, [("quant", "recipe", ""), ("layer_s", "one layer s", ".2f"), ("head_s", "lm_head s", ".2f"),
                       ("calibration_s", "calibration s", ".2f"), ("estimate_s", f"{LAYERS} layers + head s", ".1f")])
    save_results("quant_time-quick" if a.quick else "quant_time",
                 model="Phi-3-mini shapes" + (" (1024 rows of each tensor, scaled)" if a.quick else ""),
                 threads=2, rows=rows)


if __name__ == "__main__":
    main()
