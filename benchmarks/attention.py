"""Decode attention alone (one new query per row), per layer, Phi-3-mini's shape (32 heads, head_dim
96, bf16) over strided continuous-batching cache views (SlotCache's [slots, Hkv, capacity, D], rows
at their own lengths): SDPA with the per-row mask (the PyTorch path), a manual bmm softmax, and the
compiled kernel (slm_decode_attn). Several layers' caches are cycled so K/V come from memory, as in
a real decode step.

    .venv/bin/python benchmarks/attention.py      # ~1 minute; prints a table, writes results/attention.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402

H, D, SLOTS = 32, 96, 16


def bmm_attention(q, k, v, qpos, scale):
    L = k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, H, 1, L]
    mask = torch.arange(L) > qpos[:, :, None]  # [B, 1, L]
    s.masked_fill_(mask[:, None], float("-inf"))
    return torch.matmul(s.softmax(-1).to(v.dtype), v)


def best_ms(fn, layers, reps):
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        for layer in layers:
            fn(*layer)
        best = min(best, (time.perf_counter() - t) / len(layers))
    return best * 1e3


def main() -> None:
    from slmkit.kernels import qgemm as kernel
    from slmkit.models import layers as L_
    from slmkit.models.cache import Ragged

    torch.set_num_threads(torch.get_num_threads())
    if kernel.get_kernel() is None:
        sys.exit("the compiled kernel is unavailable here")
    scale = D**-0.5
    rows = []
    for keys in (72, 512):
        cap = max(512, keys + 64)
        per_layer = 2 * SLOTS * H * cap * D * 2
        n_layers = max(2, min(8, (256 << 20) // per_layer))  # > L3 in all
        g = torch.Generator().manual_seed(0)
        caches = [(torch.randn(SLOTS, H, cap, D, generator=g).bfloat16(),
                   torch.randn(SLOTS, H, cap, D, generator=g).bfloat16()) for _ in range(n_layers)]
        for B in (1, 8, 16):
            lens = torch.tensor([keys - (b % 8) for b in range(B)])
            qpos = (lens - 1)[:, None]
            end = int(lens.max())
            q = torch.randn(B, 1, H, D, generator=g).bfloat16().transpose(1, 2)
            layers = [(q, kc[:B, :, :end], vc[:B, :, :end]) for kc, vc in caches]

            def sdpa(q, k, v):
                kernel.decode_attention_enabled = False
                try:
                    return L_.attention(q, k, v, Ragged(qpos), window=None, scale=scale)
                finally:
                    kernel.decode_attention_enabled = True

            def ours(q, k, v):
                return kernel.decode_attention(q, k, v, qpos=qpos, window=None, scale=scale)

            with torch.inference_mode():
                want = sdpa(*layers[0]).float()
                assert (ours(*layers[0]).float() - want).abs().max() < 0.02
                reps = 5
                r = {"keys": keys, "rows": B, "kv_mb": 2 * B * H * end * D * 2 / 1e6,
                     "sdpa_ms": best_ms(sdpa, layers, reps), "bmm_ms": best_ms(lambda q, k, v: bmm_attention(
                         q, k, v, qpos, scale), layers, reps), "kernel_ms": best_ms(ours, layers, reps)}
            r["speedup"] = r["sdpa_ms"] / r["kernel_ms"]
            r["kernel_gb_s"] = r["kv_mb"] / r["kernel_ms"]
            rows.append(r)
            print(r, flush=True)
    print_table(rows, [("keys", "keys", ""), ("rows", "rows", ""), ("kv_mb", "K+V MB", ".1f"),
                       ("sdpa_ms", "SDPA ms", ".3f"), ("bmm_ms", "bmm ms", ".3f"), ("kernel_ms", "kernel ms", ".3f"),
                       ("speedup", "kernel vs SDPA", ".1f"), ("kernel_gb_s", "kernel GB/s", ".1f")])
    save_results("attention", shape={"heads": H, "kv_heads": H, "head_dim": D, "dtype": "bfloat16"}, rows=rows)


if __name__ == "__main__":
    main()
