"""How long `slm quantize` takes for Phi-3-mini (3.8B), estimated from one decoder layer's tensors
at Phi-3-mini shapes (random bf16 weights) times 32 layers, plus the int8 output head.

    .venv/bin/python benchmarks/quant_time.py [--quants int4,int4-mixed,int4-k] [--quick]

--quick divides every shape by 8 (a smoke run of the script; its estimate is not Phi-3-mini's).
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


def time_one(quant: str, name: str, shape: tuple[int, int]) -> float:
    from slmkit.quant.format import quantize
    from slmkit.quant.recipe import MIXED, TWO_LEVEL, keeps_int8, quantize_mixed

    w = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
    t = time.perf_counter()
    wf = w.float()
    if name == "lm_head" or (quant in (MIXED, TWO_LEVEL) and keeps_int8(name)) or quant == "int8":
        quantize(wf, 8, 32)
    elif quant == TWO_LEVEL:
        quantize_mixed(wf, 32)
    else:
        quantize(wf, 4, 32)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="int4,int4-mixed,int4-k")
    ap.add_argument("--quick", action="store_true", help="shapes / 8: checks the script runs")
    a = ap.parse_args()
    torch.set_num_threads(2)
    div = 8 if a.quick else 1
    rows = []
    for quant in a.quants.split(","):
        per = {name: time_one(quant, name, (n // div, k // div)) for name, (n, k) in LAYER_SHAPES.items()}
        head = time_one(quant, "lm_head", (HEAD[0] // div, HEAD[1] // div))
        total = LAYERS * sum(per.values()) + head
        rows.append({"quant": quant, "layer_s": sum(per.values()), "head_s": head, "estimate_s": total,
                     **{f"{k}_s": v for k, v in per.items()}})
        print(f"  {quant}: {rows[-1]}", flush=True)
    print_table(rows, [("quant", "recipe", ""), ("layer_s", "one layer s", ".2f"), ("head_s", "lm_head s", ".2f"),
                       ("estimate_s", f"{LAYERS} layers + head s", ".1f")])
    save_results("quant_time-quick" if a.quick else "quant_time",
                 model="Phi-3-mini shapes" + (" / 8" if a.quick else ""), threads=2, rows=rows)


if __name__ == "__main__":
    main()
