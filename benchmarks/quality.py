"""Perplexity of our int8 / int4 weight-only quantization (and the int4-mixed / int4-k recipes of
quant/recipe.py) next to llama.cpp's Q8_0 / Q4_0 / Q4_K_M, all made from the same float weights:
the built-in Gemma 3 270M (real weights) dequantized to F32. Each row also gives the bits per
weight of the block linears (token embedding and output head left out: they are the same kind of
choice for every row, Q8_0 / int8) and how long our quantizer took.

    .venv/bin/python benchmarks/quality.py [--tokens 512] [--quick]   # prints a table, writes results/quality.json

--quick: only float, int4 g32, the recipes and Q4_K_M (a smoke run of the script).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slmkit  # noqa: E402
from benchmarks.common import print_table, save_results  # noqa: E402
from tests.gguf.test_builtin_parity import TEXT  # noqa: E402
from tests.helpers.gguf_models import dequantized_copy  # noqa: E402

N = 512
OURS = [("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("int4-mixed", 32), ("int4-k", 32)]
QUICK = [("int4", 32), ("int4-mixed", 32), ("int4-k", 32)]


def ppl(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


def llama_quantize(src: Path, dst: Path, ftype: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, rc
    return dst


def gguf_linear_bits(path: Path) -> float:
    """Bits per weight of a GGUF file's block linears (blk.*, 2-D)."""
    from slmkit.gguf import open_gguf

    f = open_gguf(path)
    ts = [t for name, t in f.tensors.items() if name.startswith("blk.") and len(t.shape) == 2]
    return sum(t.nbytes * 8 for t in ts) / sum(t.shape[0] * t.shape[1] for t in ts)


def llama_ppl(path: Path, ids: list[int]) -> float:
    import llama_cpp

    n = len(ids)
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=n + 16, n_batch=n, logits_all=True, n_threads=2,
                          verbose=False)
    ref.eval(ids)
    return ppl(torch.from_numpy(np.array(ref.scores[:n], dtype=np.float32)), ids)


def main() -> None:
    import llama_cpp

    from slmkit.quant.recipe import bits_per_weight
    from slmkit.sources.builtin import builtin_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=N, help="tokens of the test text to score (at most ~560)")
    ap.add_argument("--quick", action="store_true", help="only float, int4 g32, the recipes and Q4_K_M")
    a = ap.parse_args()

    builtin = builtin_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="slmkit-quality-"))
    f32 = dequantized_copy(builtin, tmp / "f32.gguf")
    ref = slmkit.load(f32, dtype="float32")
    ids = ref.tokenizer.encode(TEXT)[: a.tokens]
    base = ppl(ref.logits(ids), ids)
    rows = [{"weights": "float32 (the file dequantized)", "engine": "slmkit", "ppl": base}]
    rows.append({"weights": "float32", "engine": "llama.cpp", "ppl": llama_ppl(f32, ids)})
    for quant, group in QUICK if a.quick else OURS:
        t = time.perf_counter()
        llm = slmkit.load(f32, dtype="float32", quant=quant, group_size=group)
        rows.append({"weights": f"{quant} g{group}", "engine": "slmkit", "ppl": ppl(llm.logits(ids), ids),
                     "bits": bits_per_weight(llm.engine.model), "load_s": time.perf_counter() - t})
    files = [("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
             ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)]
    for name, ftype in files[2:] if a.quick else files:
        path = llama_quantize(f32, tmp / f"{name}.gguf", ftype)
        bits = gguf_linear_bits(path)
        rows.append({"weights": f"{name} (llama.cpp quantizer)", "engine": "llama.cpp", "ppl": llama_ppl(path, ids),
                     "bits": bits})
        ours = slmkit.load(path, dtype="float32")  # the same blocks, run by our kernel
        rows.append({"weights": f"{name} (llama.cpp quantizer)", "engine": "slmkit", "ppl": ppl(ours.logits(ids), ids),
                     "bits": bits})
    if not a.quick:
        shipped = slmkit.load(builtin, dtype="float32")
        bits = gguf_linear_bits(builtin)
        rows.append({"weights": "shipped Q4_K_M file", "engine": "slmkit", "ppl": ppl(shipped.logits(ids), ids),
                     "bits": bits})
        rows.append({"weights": "shipped Q4_K_M file", "engine": "llama.cpp", "ppl": llama_ppl(builtin, ids),
                     "bits": bits})
    for r in rows:
        r["vs_float_pct"] = round((r["ppl"] / base - 1) * 100, 2)
        r["ppl"] = round(r["ppl"], 3)
    print_table(rows, [("weights", "weights", ""), ("engine", "engine", ""), ("ppl", "perplexity", ".3f"),
                       ("vs_float_pct", "vs float %", "+.2f"), ("bits", "bits/weight (linears)", ".2f"),
                       ("load_s", "load + quantize s", ".1f")])
    save_results("quality-quick" if a.quick else "quality", model="gemma3-270m (built-in) dequantized to F32",
                 tokens=len(ids), rows=rows)


if __name__ == "__main__":
    main()
