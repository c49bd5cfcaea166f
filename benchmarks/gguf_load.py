"""Phi-3-mini-size GGUF files (random weights): load time, peak RSS, prefill and decode, slmkit vs llama.cpp.

    .venv/bin/python benchmarks/gguf_load.py [--types F16,Q4_0,Q4_K_M] [--layers N] [--builtin]
    .venv/bin/python benchmarks/gguf_load.py --quick     # 2 layers, Q4_0, short runs: checks it runs (no JSON)

The F16 file is written from benchmarks/decode.py's random bf16 folder with the metadata and
tensor names llama.cpp's converter uses (tests/helpers/gguf_models.py's mapping); Q4_0 and Q4_K_M
come from llama.cpp's own quantizer (llama_cpp.llama_model_quantize). slmkit runs the quantized
blocks repacked into its kernel's layout (F16: bf16); llama.cpp runs them as they are.
slmkit is measured twice per file, each in a fresh process: "first" with an empty GGUF load cache
(it repacks in the kernel library, builds the tokenizer and starts writing the cache: "first" is the
time until the model runs; the cache is written on a thread of its own, which the child lets finish
before timing prefill and decode) and "repeated" with that cache (see slmkit/loading/gguf_cache.py);
llama.cpp has no such cache, so its one load is beside both.
--builtin adds the built-in model's file (Gemma 3 270M Q4_K_M; downloaded if it is not yet).
Prefill: 512-token prompt; decode: 128 greedy tokens after 64. One process per measurement.
Prints a table, writes benchmarks/results/gguf_load.json. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import (  # noqa: E402
    child_parser,
    make_random_phi3,
    median,
    peak_rss_gb,
    print_table,
    run_child,
    save_results,
    slmkit_speed,
)


def make_f16_gguf(folder: Path, out: Path) -> Path:
    """The random folder as an F16 GGUF, with the keys and names llama.cpp's converter writes."""
    from tests.helpers.gguf_models import hf_to_gguf

    return out if out.is_file() else hf_to_gguf(folder, out, "F16")


def quantize(f16: Path, qtype: str) -> Path:
    import llama_cpp

    out = f16.with_name(f16.name.replace("F16", qtype))
    if out.is_file():
        return out
    ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return out


def child(engine: str, path: str, prompt: int, decode: int, reps: int = 1) -> dict:
    """One engine on one file: load time, then the medians of `reps` prefill and decode runs."""
    if engine == "slmkit":
        return slmkit_speed(path, prompt=prompt, decode=decode, reps=reps)
    import llama_cpp

    ids = torch.randint(100, 30000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()  # as slmkit
    t0 = time.perf_counter()
    ref = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    load_s = time.perf_counter() - t0
    prefill, dec = [], []
    for _ in range(reps):
        ref.reset()
        t = time.perf_counter()
        ref.eval(ids)
        prefill.append(prompt / (time.perf_counter() - t))
    for _ in range(reps):
        ref.reset()
        ref.eval(ids[:64])
        ref.eval([int(ref.scores[ref.n_tokens - 1].argmax())])  # first decode step, then start the clock
        t = time.perf_counter()
        for _ in range(decode - 1):  # greedy, one token per eval, as slmkit's loop
            ref.eval([int(ref.scores[ref.n_tokens - 1].argmax())])
        dec.append((decode - 1) / (time.perf_counter() - t))
    return {"load_s": load_s, "prefill_tok_s": median(prefill), "decode_tok_s": median(dec),
            "peak_rss_gb": peak_rss_gb(), "runs_as": "the file's own types"}


def main() -> None:
    ap = child_parser("F16,Q4_0,Q4_K_M")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 layers, Q4_0, short runs; nothing written")
    ap.add_argument("--builtin", action="store_true", help="also the built-in model's GGUF (if downloaded)")
    a = ap.parse_args()
    if a.quick:  # a check that it runs, not a measurement
        a.layers, a.prompt, a.decode = a.layers or 2, 32, 8
        a.types = a.types if "--types" in sys.argv else "Q4_0"
    torch.set_num_threads(2)
    if a.child:
        print(json.dumps(child(a.engine, a.path, a.prompt, a.decode)))
        return
    from slmkit.kernels.qgemm import get_kernel

    get_kernel()  # built (if it must be) here, so no child's load time includes compiling it
    folder = make_random_phi3(Path(a.folder if not a.layers else f"{a.folder}-{a.layers}l"), a.layers)
    f16 = make_f16_gguf(folder, folder.parent / f"{folder.name}-F16.gguf")
    files: list[tuple[str, Path]] = []
    for qtype in a.types.split(","):
        t = time.perf_counter()
        path = f16 if qtype == "F16" else quantize(f16, qtype)
        print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB (ready in {time.perf_counter() - t:.0f} s)", flush=True)
        files.append((qtype, path))
    if a.builtin:
        files.append(("builtin " + BUILTIN, _builtin_path()))
    rows = []
    for label, path in files:
        rows += measure(label, path, a.prompt, a.decode)
    print()
    print_table(rows, [("file", "GGUF", ""), ("engine", "engine", ""), ("load", "load", ""), ("runs_as", "runs as", ""),
                       ("load_s", "load s", ".2f"),
                       ("load_vs_llama", "load / llama.cpp", ".2f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
                       ("prefill_tok_s", "prefill tok/s", ".1f"), ("decode_tok_s", "decode tok/s", ".2f")])
    if a.quick:
        print("\n--quick: nothing written")
        return
    save_results("gguf_load", layers=a.layers or 32, rows=rows, llama_cpp=_llama_version())


BUILTIN = "gemma3-270m Q4_K_M"


def _builtin_path() -> Path:
    from slmkit.sources.builtin import builtin_model_path

    return builtin_model_path()


def warm(path: Path) -> None:
    """Read the file through once, so that every engine's load starts with it in the page cache (this
    VM reclaims cold page cache: a file left alone for minutes came back from disk, at ~1 s a GB)."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def measure(label: str, path: Path, prompt: int, decode: int) -> list[dict]:
    """slmkit's first load (empty cache) and repeated load (that cache), then llama.cpp, one process
    each, each after the file was read through once (warm)."""
    rows = []
    args = ["--path", str(path), "--prompt", str(prompt), "--decode", str(decode)]
    with tempfile.TemporaryDirectory(prefix="slmkit-gguf-cache-") as cache:
        env_before = os.environ.get("SLMKIT_GGUF_CACHE")
        os.environ["SLMKIT_GGUF_CACHE"] = cache  # the children inherit it
        try:
            for load in ("first", "repeated"):
                warm(path)
                r = run_child(Path(__file__), ["--engine", "slmkit", *args])
                rows.append({"file": label, "engine": "slmkit", "load": load, **r})
                print(f"  slmkit ({load} load): {r}", flush=True)
        finally:
            if env_before is None:
                os.environ.pop("SLMKIT_GGUF_CACHE", None)
            else:
                os.environ["SLMKIT_GGUF_CACHE"] = env_before
    warm(path)
    r = run_child(Path(__file__), ["--engine", "llama.cpp", *args])
    rows.append({"file": label, "engine": "llama.cpp", "load": "every", **r})
    print(f"  llama.cpp: {r}", flush=True)
    for row in rows[:2]:  # slmkit's load time as a share of llama.cpp's (the targets: <= 1.0 and <= 0.5)
        if "load_s" in row and "load_s" in r:
            row["load_vs_llama"] = row["load_s"] / r["load_s"]
    return rows


def _llama_version() -> str:
    try:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__} (built from source here, GGML_NATIVE, no AMX on this CPU)"
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
