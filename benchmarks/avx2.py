"""The AVX2 kernels (SLMKIT_KERNEL=avx2) beside the AVX512 ones and beside llama.cpp built for AVX2 only.

    .venv/bin/python benchmarks/avx2.py --quick          # small shapes, kernels only: checks it runs (no JSON)
    benchmarks/build_llama_avx2.sh                        # once: llama-bench without AVX512 (minutes)
    .venv/bin/python benchmarks/avx2.py                   # kernels, then Q4_0 / Q4_K_M Phi-3-mini GGUFs

Kernels (in this process, each variant's library loaded side by side): decode GEMV GB/s of weight
read per format (int4 / int8 / GGUF blocks through qgemm, bfloat16 / float32 through fgemm) over
Phi-3-mini's linear shapes, and 8-row GMAC/s. Models: the files of benchmarks/gguf_load.py (random
Phi-3-mini, llama.cpp's own quantizer); prefill (512 tokens) and decode (128 after 64) tok/s for
slmkit forced to AVX2, slmkit's own pick, and llama-bench from build_llama_avx2.sh, each in its own
process; --rounds N repeats the engines in turn N times and reports each one's median (this VM's memory
rate swings by 10-20% over minutes, which moves decode: interleaved rounds see the same swings). Prints
tables, writes benchmarks/results/avx2.json (every round's numbers too). Run on an otherwise idle machine.
On a CPU with AVX-VNNI slmkit's AVX2 path uses it (the kernel column says so) unless SLMKIT_AVX_VNNI=0:
build llama-bench with AVX_VNNI=ON there, or run with SLMKIT_AVX_VNNI=0, so both sides match (a note
is printed where they do not).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import make_random_phi3, median, print_table, run_child, save_results, slmkit_speed  # noqa: E402
from qgemv import best_s, weights  # noqa: E402

SHAPES = [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]  # qkv, o, gate_up, down
QUICK_SHAPES = [(256, 512), (512, 256)]
LLAMA_BENCH = ROOT / ".llama-avx2" / "bin" / "llama-bench"


def kernel_rows(shapes: list[tuple[int, int]], formats: list[str], reps: int) -> list[dict]:
    from slmkit.kernels import qgemm
    from slmkit.kernels.qgemm import fmatmul_kernel, load_variant, pack_float_weight, qmatmul_kernel

    libs = {}
    for which in qgemm.VARIANTS:
        try:
            libs[which] = load_variant(which)
        except RuntimeError as e:
            print(f"{which}: {e}", flush=True)
    rows = []
    ks = {k for _, k in shapes}
    for fmt in formats:
        dt = torch.float32 if fmt == "fp32" else torch.bfloat16
        x = {m: {k: torch.randn(m, k).to(dt) for k in ks} for m in (1, 8)}
        for which, lib in libs.items():
            if fmt in ("bf16", "fp32"):
                ws = [(pack_float_weight(lib, (torch.randn(n, k) * 0.05).to(dt)), n, k) for n, k in shapes]
                nbytes = sum(w.nbytes for w, _, _ in ws)

                def run(m: int, ws=ws, lib=lib, x=x) -> None:
                    for w, n, k in ws:
                        fmatmul_kernel(lib, x[m][k], w, n=n)
            else:
                qs = [weights(fmt.replace(" ", ""), n, k) for n, k in shapes]
                nbytes = sum(q.nbytes for q in qs)

                def run(m: int, qs=qs, lib=lib, x=x) -> None:
                    for q in qs:
                        qmatmul_kernel(lib, x[m][q.k], q, torch.bfloat16)
            run(1)  # warm-up
            one = best_s(lambda run=run: run(1), reps)
            eight = best_s(lambda run=run: run(8), reps)
            macs = sum(n * k for n, k in shapes) * 8
            rows.append({"format": fmt, "kernel": which, "decode_gb_s": nbytes / one / 1e9,
                         "m8_gmac_s": macs / eight / 1e9})
            print(rows[-1], flush=True)
    return rows


def child(engine: str, path: str, prompt: int, decode: int) -> dict:
    """One engine on one file, in its own process (SLMKIT_KERNEL is set by the parent)."""
    if engine.startswith("slmkit"):
        from slmkit.kernels import qgemm

        r = slmkit_speed(path, prompt=prompt, decode=decode)
        kernel = qgemm.variant or "fallback"
        lib = qgemm.get_kernel()
        if kernel == "avx2" and lib is not None and lib.slm_avx_vnni():
            kernel += " + AVX-VNNI"
        return {**r, "kernel": kernel}
    out = subprocess.run([str(LLAMA_BENCH), "-m", path, "-t", "2", "-p", str(prompt), "-n", str(decode), "-r", "2",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    res = {("prefill_tok_s" if r["n_prompt"] else "decode_tok_s"): r["avg_ts"] for r in json.loads(out)}
    return {**res, "kernel": "llama.cpp AVX2" + (" + AVX-VNNI" if llama_avx_vnni() else "")}


def llama_avx_vnni() -> bool:
    """Whether build_llama_avx2.sh built llama-bench with AVX-VNNI (AVX_VNNI=ON): the slmkit-avx2 row uses
    it where the CPU has it (SLMKIT_AVX_VNNI=0 turns it off), so the two rows should say the same."""
    cache = LLAMA_BENCH.parent.parent / "build" / "CMakeCache.txt"
    try:
        return "GGML_AVX_VNNI:BOOL=ON" in cache.read_text()
    except OSError:
        return False


def model_rows(layers: int | None, types: list[str], prompt: int, decode: int, rounds: int = 1) -> list[dict]:
    from gguf_load import make_f16_gguf, quantize

    folder = make_random_phi3(Path(f"/tmp/slmkit-bench/phi3-mini-random{f'-{layers}l' if layers else ''}"), layers)
    f16 = make_f16_gguf(folder, folder.parent / f"{folder.name}-F16.gguf")
    engines = ["slmkit-avx2", "slmkit", "llama.cpp-avx2"] if LLAMA_BENCH.is_file() else ["slmkit-avx2", "slmkit"]
    if not LLAMA_BENCH.is_file():
        print(f"no {LLAMA_BENCH}: run benchmarks/build_llama_avx2.sh for the llama.cpp column", flush=True)
    rows = []
    for qtype in types:
        path = quantize(f16, qtype)
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for i in range(rounds):
            for engine in engines:
                env = {**os.environ, "SLMKIT_KERNEL": "avx2"} if engine == "slmkit-avx2" else None
                old = os.environ.copy()
                if env:
                    os.environ.update(env)
                try:
                    r = run_child(Path(__file__), ["--engine", engine, "--path", str(path), "--prompt", str(prompt),
                                                   "--decode", str(decode)])
                finally:
                    os.environ.clear()
                    os.environ.update(old)
                runs[engine].append(r)
                print(f"{qtype} round {i + 1}: {engine} {r}", flush=True)
        for engine, rs in runs.items():
            rows.append({"file": qtype, "engine": engine, **summary(rs)})
    return rows


def summary(rs: list[dict]) -> dict:
    """One engine's rounds: the medians of its numbers (a round's own fields where they are not numbers),
    with every round's prefill and decode kept."""
    out = dict(rs[-1])
    for key in {k for r in rs for k, v in r.items() if isinstance(v, float)}:
        out[key] = median([r[key] for r in rs if isinstance(r.get(key), float)])
    if len(rs) > 1:
        out["rounds"] = [{k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s")} for r in rs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small shapes, two formats, kernels only")
    ap.add_argument("--layers", type=int, default=None, help="fewer model layers (default: all 32)")
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="each engine this many times, in turn; medians")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.child:
        print(json.dumps(child(a.engine, a.path, a.prompt, a.decode)))
        return
    t = time.perf_counter()
    formats = ["int4 g32", "Q4_K"] if a.quick else ["int4 g32", "int4 g128", "int8", "Q4_0", "Q4_K", "Q6_K", "Q8_0",
                                                     "bf16", "fp32"]
    krows = kernel_rows(QUICK_SHAPES if a.quick else SHAPES, formats, 1 if a.quick else 3)
    print()
    print_table(krows, [("format", "format", ""), ("kernel", "kernel", ""), ("decode_gb_s", "decode GB/s", ".1f"),
                        ("m8_gmac_s", "8 rows GMAC/s", ".1f")])
    mrows = [] if a.quick else model_rows(a.layers, a.types.split(","), a.prompt, a.decode, a.rounds)
    kinds = {r["kernel"].endswith("AVX-VNNI") for r in mrows if r["engine"] != "slmkit" and "kernel" in r}
    if len(kinds) > 1:
        print("note: AVX-VNNI on one AVX2 side only; build llama-bench with AVX_VNNI=ON, or run with "
              "SLMKIT_AVX_VNNI=0", flush=True)
    if mrows:
        print()
        print_table(mrows, [("file", "GGUF", ""), ("engine", "engine", ""), ("kernel", "kernel", ""),
                            ("prefill_tok_s", "prefill tok/s", ".1f"), ("decode_tok_s", "decode tok/s", ".2f")])
    if a.quick:  # a check that it runs, not a measurement
        print(f"\n--quick: nothing written ({time.perf_counter() - t:.0f} s)")
        return
    save_results("avx2", layers=a.layers or 32, rounds=a.rounds, kernels=krows, models=mrows,
                 llama_bench=str(LLAMA_BENCH) if LLAMA_BENCH.is_file() else None, seconds=time.perf_counter() - t)


if __name__ == "__main__":
    main()
