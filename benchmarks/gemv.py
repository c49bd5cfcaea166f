"""Single-token (decode) GEMV read bandwidth over the five Phi-3-mini linear shapes, per method.

    .venv/bin/python benchmarks/gemv.py [--rows 1,8,128]

Why loading/packing.py exists: which PyTorch path reads bf16 weights fastest differs by CPU
(an Intel AMX machine measured earlier favoured torch.mv; this project's AVX512-BF16 EPYC favours
oneDNN-packed weights), and what the batch-invariant kernel (fgemm.cpp, packed tiles or a weight
read in place) costs against them. --rows: also M rows at once (a batch, a prefill chunk), in
GFLOP/s. Interleaved rounds, medians. Writes benchmarks/results/gemv.json.
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


def methods_for(dtype: torch.dtype, W: dict, X: dict) -> dict:
    from slmkit.kernels.qgemm import fmatmul_kernel, get_kernel, pack_float_weight

    methods = {"F.linear": lambda k: F.linear(X[k], W[k])}
    if next(iter(X.values())).shape[0] == 1:
        methods["torch.mv"] = lambda k: torch.mv(W[k], X[k][0])
    if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        P = {k: torch.ops.mkldnn._reorder_linear_weight(w, None) for k, w in W.items()}
        methods["oneDNN packed"] = lambda k: torch.ops.mkldnn._linear_pointwise(X[k], P[k], None, "none", [], "")
    lib = get_kernel()
    if lib is not None:  # the batch-invariant kernel, as engine/packing.py uses it
        T = {k: pack_float_weight(lib, w) for k, w in W.items()}
        methods["slmkit fgemm packed"] = lambda k: fmatmul_kernel(lib, X[k], T[k], n=W[k].shape[0])
        methods["slmkit fgemm rows (in place)"] = lambda k: fmatmul_kernel(lib, X[k], W[k])
    return methods


def main(rounds: int = 5, iters: int = 10, ms: tuple[int, ...] = (1,)) -> None:
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        W = {k: torch.randn(*s).to(dtype) for k, s in SHAPES.items()}
        for m in ms:
            X = {k: torch.randn(m, s[1]).to(dtype) for k, s in SHAPES.items()}
            methods = methods_for(dtype, W, X)
            nbytes = sum(w.numel() * w.element_size() for w in W.values())
            flops = 2 * m * sum(w.numel() for w in W.values())
            n = max(1, iters // m)
            res: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(rounds):
                for name, f in methods.items():
                    for k in W:
                        f(k)
                    t = time.perf_counter()
                    for _ in range(n):
                        for k in W:
                            f(k)
                    res[name].append(n / (time.perf_counter() - t))
            for name, v in res.items():
                calls = statistics.median(v)  # passes over the five shapes per second
                rows.append({"dtype": str(dtype).removeprefix("torch."), "rows": m, "method": name,
                             "read_gb_s": calls * nbytes / 1e9, "gflop_s": calls * flops / 1e9,
                             "linear_only_tok_s": calls * m * nbytes / _phi3_bytes(dtype)})
    print_table(rows, [("dtype", "dtype", ""), ("rows", "M", ""), ("method", "method", ""),
                       ("read_gb_s", "read GB/s", ".1f"), ("gflop_s", "GFLOP/s", ".0f"),
                       ("linear_only_tok_s", "Phi-3-mini linears tok/s", ".2f")])
    save_results("gemv", rows=rows)


def _phi3_bytes(dtype: torch.dtype) -> int:
    per_layer = sum(a * b for k, (a, b) in SHAPES.items() if k != "lm_head")
    return (32 * per_layer + 32064 * 3072) * torch.tensor([], dtype=dtype).element_size()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1", help="comma-separated row counts M (1: decode)")
    main(ms=tuple(int(m) for m in ap.parse_args().rows.split(",")))
