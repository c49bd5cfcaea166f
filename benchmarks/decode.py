"""Phi-3-mini-size (3.82B, random weights) prefill / decode / load / peak RSS, slmkit vs transformers.

    .venv/bin/python benchmarks/decode.py                 # full size, all engines
    .venv/bin/python benchmarks/decode.py --layers 4      # quick check on a shallow model

Prefill: a 512-token prompt, one forward pass producing the first token. Decode: 128 greedy tokens
after a 64-token prompt. Each engine runs in its own process; medians of --reps runs.
Prints a table and writes benchmarks/results/decode.json. Do not run beside tests or other load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_random_phi3, median, peak_rss_gb, print_table, run_child, slmkit_speed  # noqa: E402,E501

ENGINES = ["slmkit-bf16", "slmkit-bf16-plain", "slmkit-fp32", "transformers-bf16", "transformers-fp32"]


def child_slmkit(folder: str, dtype: str, prompt: int, decode: int, reps: int, pack: bool = True) -> dict:
    return slmkit_speed(folder, prompt=prompt, decode=decode, reps=reps, dtype=dtype, pack=pack)


def child_transformers(folder: str, dtype: str, prompt: int, decode: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (1, prompt), generator=g)
    mask = torch.ones_like(ids)
    prefill, dec = [], []
    with torch.inference_mode():
        model(ids[:, :8])
        for _ in range(reps):
            t = time.perf_counter()
            model(ids, attention_mask=mask, logits_to_keep=1)
            prefill.append(prompt / (time.perf_counter() - t))
        p64, m64 = ids[:, :64], mask[:, :64]
        for _ in range(reps):
            t = time.perf_counter()
            model.generate(p64, attention_mask=m64, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(p64, attention_mask=m64, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
            dec.append((decode - 1) / (time.perf_counter() - t - t1))
    return {"load_s": load_s, "prefill_tok_s": median(prefill), "decode_tok_s": median(dec),
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--folder", default="/tmp/slmkit-bench/phi3-mini-random")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run (default: all 32)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.child:
        name, dtype, *variant = a.engine.split("-")
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
        if name == "slmkit":  # "-plain": plain nn.Linear weights (pack=False), the pure-PyTorch path
            r = child_slmkit(a.folder, dtype, a.prompt, a.decode, a.reps, pack=variant != ["plain"])
        else:
            r = child_transformers(a.folder, dtype, a.prompt, a.decode, a.reps)
        print(json.dumps(r))
        return
    folder = Path(a.folder if not a.layers else f"{a.folder}-{a.layers}l")
    t = time.perf_counter()
    make_random_phi3(folder, a.layers)
    print(f"model: {folder} ({time.perf_counter() - t:.0f} s to build)", flush=True)
    rows = []
    for engine in a.engines.split(","):
        r = run_child(Path(__file__), ["--engine", engine, "--folder", str(folder), "--prompt", str(a.prompt),
                                       "--decode", str(a.decode), "--reps", str(a.reps)])
        rows.append({"engine": engine, **r})
        print(f"  {engine}: {r}", flush=True)
    print()
    print_table(rows, [("engine", "engine", ""), ("prefill_tok_s", "prefill tok/s", ".1f"),
                       ("decode_tok_s", "decode tok/s", ".2f"), ("load_s", "load s", ".2f"),
                       ("peak_rss_gb", "peak RSS GB", ".2f")])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "decode", "machine": machine(), "layers": a.layers or 32,
                                       "prompt_tokens": a.prompt, "decode_tokens": a.decode, "reps": a.reps,
                                       "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
