"""Single-token (decode) GEMV read bandwidth over the five Phi-3-mini linear shapes, per method.

    .venv/bin/python benchmarks/gemv.py

Why loading/packing.py exists: which PyTorch path reads bf16 weights fastest differs by CPU
(an Intel AMX machine measured earlier favoured torch.mv; this project's AVX512-BF16 EPYC favours
oneDNN-packed weights). Interleaved rounds, medians. Writes benchmarks/results/gemv.json.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_results  # noqa: E402

SHAPES = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
          "down_proj": (3072, 8192), "lm_head": (32064, 3072)}


def main(rounds: int = 5, iters: int = 10) -> None:
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        W = {k: torch.randn(*s).to(dtype) for k, s in SHAPES.items()}
        X = {k: torch.randn(1, s[1]).to(dtype) for k, s in SHAPES.items()}
        methods = {"F.linear [1,K]": lambda k: F.linear(X[k], W[k]), "torch.mv": lambda k: torch.mv(W[k], X[k][0])}
        if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            P = {k: torch.ops.mkldnn._reorder_linear_weight(w, None) for k, w in W.items()}
            methods["oneDNN packed"] = lambda k: torch.ops.mkldnn._linear_pointwise(X[k], P[k], None, "none", [], "")
        nbytes = sum(w.numel() * w.element_size() for w in W.values())
        res: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(rounds):
            for m, f in methods.items():
                for k in W:
                    f(k)
                t = time.perf_counter()
                for _ in range(iters):
                    for k in W:
                        f(k)
                res[m].append(nbytes * iters / (time.perf_counter() - t) / 1e9)
        for m, v in res.items():
            gbs = statistics.median(v)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "method": m, "read_gb_s": gbs,
                         "linear_only_tok_s": gbs * 1e9 / _phi3_bytes(dtype)})
    print_table(rows, [("dtype", "dtype", ""), ("method", "method", ""), ("read_gb_s", "read GB/s", ".1f"),
                       ("linear_only_tok_s", "Phi-3-mini linears tok/s", ".2f")])
    save_results("gemv", rows=rows)


def _phi3_bytes(dtype: torch.dtype) -> int:
    per_layer = sum(a * b for k, (a, b) in SHAPES.items() if k != "lm_head")
    return (32 * per_layer + 32064 * 3072) * torch.tensor([], dtype=dtype).element_size()


if __name__ == "__main__":
    main()
