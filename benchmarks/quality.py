"""Perplexity of our int8 / int4 weight-only quantization next to llama.cpp's Q8_0 / Q4_0 / Q4_K_M,
all made from the same float weights: the built-in Gemma 3 270M (real weights) dequantized to F32.

    .venv/bin/python benchmarks/quality.py     # ~2 minutes; prints a table, writes results/quality.json
"""
from __future__ import annotations

import math
import sys
import tempfile
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


def llama_ppl(path: Path, ids: list[int]) -> float:
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(path), n_ctx=N + 16, n_batch=N, logits_all=True, n_threads=2,
                          verbose=False)
    ref.eval(ids)
    return ppl(torch.from_numpy(np.array(ref.scores[:N], dtype=np.float32)), ids)


def main() -> None:
    import llama_cpp

    from slmkit.sources.builtin import builtin_model_path

    builtin = builtin_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="slmkit-quality-"))
    f32 = dequantized_copy(builtin, tmp / "f32.gguf")
    ref = slmkit.load(f32, dtype="float32")
    ids = ref.tokenizer.encode(TEXT)[:N]
    base = ppl(ref.logits(ids), ids)
    rows = [{"weights": "float32 (the file dequantized)", "engine": "slmkit", "ppl": base}]
    rows.append({"weights": "float32", "engine": "llama.cpp", "ppl": llama_ppl(f32, ids)})
    for quant, group in [("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]:
        llm = slmkit.load(f32, dtype="float32", quant=quant, group_size=group)
        rows.append({"weights": f"{quant} g{group}", "engine": "slmkit", "ppl": ppl(llm.logits(ids), ids)})
    for name, ftype in [("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                        ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)]:
        path = llama_quantize(f32, tmp / f"{name}.gguf", ftype)
        rows.append({"weights": f"{name} (llama.cpp quantizer)", "engine": "llama.cpp", "ppl": llama_ppl(path, ids)})
        ours = slmkit.load(path, dtype="float32")  # the same blocks, run by our kernel
        rows.append({"weights": f"{name} (llama.cpp quantizer)", "engine": "slmkit", "ppl": ppl(ours.logits(ids), ids)})
    shipped = slmkit.load(builtin, dtype="float32")
    rows.append({"weights": "shipped Q4_K_M file", "engine": "slmkit", "ppl": ppl(shipped.logits(ids), ids)})
    rows.append({"weights": "shipped Q4_K_M file", "engine": "llama.cpp", "ppl": llama_ppl(builtin, ids)})
    for r in rows:
        r["vs_float_pct"] = round((r["ppl"] / base - 1) * 100, 2)
        r["ppl"] = round(r["ppl"], 3)
    print_table(rows, [("weights", "weights", ""), ("engine", "engine", ""), ("ppl", "perplexity", ".3f"),
                       ("vs_float_pct", "vs float %", "+.2f")])
    save_results("quality", model="gemma3-270m (built-in) dequantized to F32", tokens=N, rows=rows)


if __name__ == "__main__":
    main()
