"""Quantized Phi-3-mini (3.8B, random weights) on 2 threads: slmkit's int4/int8 kernel vs llama.cpp.

    .venv/bin/python benchmarks/quant.py [--types Q8_0,Q4_0,Q4_K_M] [--ours int4:32,int4:128,int8:32]

Rows: each GGUF file (made by llama.cpp's quantizer from benchmarks/gguf_load.py's F16 file) run by
both engines, and slmkit's own int4 / int8 folders (`slm quantize` of the random bf16 folder).
Columns: load s, peak RSS, prefill tok/s (512-token prompt), decode tok/s (128 greedy tokens after
64; medians of 3 runs each), bytes of weights read per decoded token, the fraction of the read roofline that is, and our
ratio to llama.cpp on the same file (or to llama.cpp's Q4_0 for our int4 rows, Q8_0 for int8).
One process per measurement. Prints a table, writes results/quant.json. Run on an idle machine.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import child_parser, make_random_phi3, print_table, run_child, save_results, slmkit_speed  # noqa: E402
from gguf_load import child as llama_child  # noqa: E402
from gguf_load import make_f16_gguf, quantize  # noqa: E402


def read_bandwidth_gbs() -> float:
    """Best of 5 sums over 1 GiB (2 threads): what a weight-streaming decode can read per second."""
    x = torch.ones(1 << 28, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of linear weights a decode step reads (the embedding is a row lookup)."""
    from slmkit.quant.linear import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n += m.weight_q.nbytes
        elif isinstance(m, torch.nn.Linear):
            n += m.weight.nbytes
        elif hasattr(m, "packed"):
            n += m.in_features * m.out_features * 2
    return n


def gguf_bytes_per_token(path: str) -> int:
    from slmkit.gguf import open_gguf

    f = open_gguf(path)
    tied = "output.weight" not in f.tensors
    return sum(t.nbytes for name, t in f.tensors.items()
               if len(t.shape) == 2 and (name != "token_embd.weight" or tied))


REPS = 3  # medians of 3 prefill and 3 decode runs per engine: single runs here vary by +-15%


def child(engine: str, path: str, prompt: int, decode: int) -> dict:
    if engine == "llama.cpp":
        r = llama_child(engine, path, prompt, decode, REPS)
        r["bytes_per_token"] = gguf_bytes_per_token(path)
        return r
    import slmkit
    from slmkit.quant.linear import QuantLinear, kernel_active

    r = slmkit_speed(path, prompt=prompt, decode=decode, reps=REPS)
    llm = slmkit.load(path)  # again, only to describe it (pages are shared with the first load's cache)
    kinds = sorted({f"int{m.bits}" for m in llm.engine.model.modules() if isinstance(m, QuantLinear)})
    r["runs_as"] = "+".join(kinds) + (" (VNNI kernel)" if kernel_active() else " (fallback)")
    r["bytes_per_token"] = weight_bytes_per_token(llm.engine.model)
    return r


def ensure_folder(src: Path, quant: str, group: int) -> Path:
    dst = src.parent / f"{src.name}-{quant}-g{group}"
    if not (dst / "config.json").is_file():
        from slmkit.cli import main as slm

        t = time.perf_counter()
        assert slm(["quantize", str(src), str(dst), "--quant", quant, "--group-size", str(group)]) == 0
        print(f"{dst.name}: quantized in {time.perf_counter() - t:.0f} s", flush=True)
    return dst


def main() -> None:
    ap = child_parser("Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--ours", default="int4:32,int4:128,int8:32")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.child:
        print(json.dumps(child(a.engine, a.path, a.prompt, a.decode)))
        return
    folder = make_random_phi3(Path(a.folder))
    f16 = make_f16_gguf(folder, folder.parent / f"{folder.name}-F16.gguf")
    jobs = [(q, "file", quantize(f16, q)) for q in a.types.split(",") if q]
    jobs += [(spec, "folder", ensure_folder(folder, spec.split(":")[0], int(spec.split(":")[1])))
             for spec in a.ours.split(",") if spec]
    bw = read_bandwidth_gbs()
    print(f"read roofline: {bw:.1f} GB/s", flush=True)
    rows: list[dict] = []
    for name, kind, path in jobs:
        for engine in (("slmkit", "llama.cpp") if kind == "file" else ("slmkit",)):
            r = run_child(Path(__file__), ["--engine", engine, "--path", str(path), "--prompt", str(a.prompt),
                                           "--decode", str(a.decode)])
            r.update(model=name if kind == "file" else f"slmkit {name}", engine=engine)
            r["roofline"] = r["bytes_per_token"] * r["decode_tok_s"] / (bw * 1e9)
            rows.append(r)
            print(f"  {name} {engine}: {r}", flush=True)
    llama = {r["model"]: r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        if r["engine"] != "slmkit":
            continue
        peer = llama.get(r["model"]) or llama.get("Q4_0" if "int4" in r["model"] else "Q8_0")
        if peer:
            r["vs"] = peer["model"]
            r["decode_x"] = r["decode_tok_s"] / peer["decode_tok_s"]
            r["prefill_x"] = r["prefill_tok_s"] / peer["prefill_tok_s"]
            r["load_x"] = r["load_s"] / peer["load_s"]
        r["rss_per_model_bytes"] = r["peak_rss_gb"] * 1e9 / r["bytes_per_token"]
    print()
    print_table(rows, [("model", "weights", ""), ("engine", "engine", ""), ("runs_as", "runs as", ""),
                       ("load_s", "load s", ".2f"), ("peak_rss_gb", "RSS GB", ".2f"),
                       ("prefill_tok_s", "prefill tok/s", ".1f"), ("decode_tok_s", "decode tok/s", ".2f"),
                       ("roofline", "of roofline", ".0%"), ("vs", "vs llama.cpp", ""),
                       ("decode_x", "decode x", ".2f"), ("prefill_x", "prefill x", ".2f"),
                       ("load_x", "load x", ".2f")])
    save_results("quant", read_roofline_gbs=bw, rows=rows)


if __name__ == "__main__":
    main()
