"""The quantized kernel alone: decode GEMV read bandwidth (weights streamed from memory, and from
L3 to show the compute ceiling) and multi-row GMAC/s, per format, over Phi-3-mini's linear shapes.

    .venv/bin/python benchmarks/qgemv.py      # ~1 minute; prints a table, writes results/qgemv.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402

SHAPES = [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]  # qkv, o, gate_up, down


def weights(fmt: str, n: int, k: int):
    from slmkit.quant.format import quantize

    if fmt.startswith("int"):
        bits, group = (4, int(fmt.split("g")[1])) if fmt.startswith("int4") else (8, 32)
        return quantize(torch.randn(n, k), bits, group)
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    blocks = random_blocks(fmt, (n, k), np.random.default_rng(0))
    raw = torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1).copy())
    return repack(raw, int(Q[fmt]), (n, k))


def best_s(fn, reps: int) -> float:
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from slmkit.kernels.qgemm import get_kernel, qmatmul_kernel
    from slmkit.quant.format import QuantWeight

    torch.set_num_threads(2)
    lib = get_kernel()
    if lib is None:
        sys.exit("the compiled kernel is unavailable here")
    rows = []
    for fmt in ("int4 g32", "int4 g128", "int8", "Q4_0", "Q4_K", "Q6_K", "Q8_0"):
        base = [weights(fmt.replace(" ", ""), n, k) for n, k in SHAPES]
        copies = [[QuantWeight(**{f: (getattr(q, f).clone() if isinstance(getattr(q, f), torch.Tensor) else
                                      getattr(q, f)) for f in q.__dataclass_fields__}) for q in base] for _ in range(5)]
        x = {k: torch.randn(1, k).bfloat16() for k in (3072, 8192)}
        nbytes = sum(q.nbytes for layer in copies for q in layer)
        stream = best_s(lambda: [qmatmul_kernel(lib, x[q.k], q, torch.bfloat16) for layer in copies for q in layer], 3)
        small = weights(fmt.replace(" ", ""), 4096, 3072)  # 6-13 MB: stays in the 32 MB L3
        cached = best_s(lambda: [qmatmul_kernel(lib, x[3072], small, torch.bfloat16) for _ in range(20)], 5)
        xm = {k: torch.randn(8, k).bfloat16() for k in (3072, 8192)}
        m8 = best_s(lambda: [qmatmul_kernel(lib, xm[q.k], q, torch.bfloat16) for q in base], 3)
        macs = sum(n * k for n, k in SHAPES) * 8
        rows.append({"format": fmt, "stream_gb_s": nbytes / stream / 1e9, "l3_gb_s": 20 * small.nbytes / cached / 1e9,
                     "m8_gmac_s": macs / m8 / 1e9,
                     "bits_per_weight": 8 * base[0].nbytes / (SHAPES[0][0] * SHAPES[0][1])})
        print(rows[-1], flush=True)
    x = torch.ones(1 << 28)
    read = max(x.nbytes / best_s(lambda: x.sum(), 1) / 1e9 for _ in range(5))
    print_table(rows, [("format", "format", ""), ("bits_per_weight", "bits/weight", ".2f"),
                       ("stream_gb_s", "decode GB/s (memory)", ".1f"), ("l3_gb_s", "decode GB/s (L3)", ".1f"),
                       ("m8_gmac_s", "8 rows GMAC/s", ".0f")])
    print(f"torch sum read bandwidth now: {read:.1f} GB/s")
    save_results("qgemv", read_gb_s=read, rows=rows)


if __name__ == "__main__":
    main()
