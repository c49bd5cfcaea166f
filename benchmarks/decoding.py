"""Per-token cost of the logits-processor chain and of constrained decoding, next to a decode step.

    .venv/bin/python benchmarks/decoding.py [--phi3 /tmp/slmkit-bench/phi3-mini-random-int4-g32]

Chains timed on [1, V] float32 logits (V = Phi-3's 32064) after 256 tokens of history: greedy
(nothing), the default sampling chain (temperature, top-k 40, top-p 0.9), everything (plus min-p,
typical-p, repetition / presence / frequency penalties, no-repeat 3-grams, logit_bias), and a
JSON-schema token mask (llguidance) with its state advance. Decode steps: the tiny test model and,
when the folder exists, Phi-3-mini int4 (`benchmarks/quant.py` makes it). Prints a table, writes
results/decoding.json. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402


def per_call_ms(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def decode_step_ms(model: str | Path, **load_kw) -> float:
    import slmkit
    from slmkit import Generator, GeneratorParams

    llm = slmkit.load(model, **load_kw)
    gen = Generator(llm, GeneratorParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    gen.append_tokens(list(range(10, 74)))
    gen.generate_next_token()
    t = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phi3", default="/tmp/slmkit-bench/phi3-mini-random-int4-g32")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from slmkit import GeneratorParams
    from slmkit.engine.processors import process

    V = 32064
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=g) * 4
    seq = [torch.randint(0, V, (256,), generator=g).tolist()]
    chains = {
        "greedy": GeneratorParams(temperature=0),
        "default sampling (T, top-k 40, top-p 0.9)": GeneratorParams(temperature=0.7, top_k=40, top_p=0.9),
        "everything": GeneratorParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95,
                                      repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5,
                                      no_repeat_ngram_size=3, logit_bias={5: 2.0, 7: -3.0}),
    }
    rows = []
    for name, p in chains.items():
        rows.append({"what": f"{name}, vocab {V}", "ms": per_call_ms(lambda p=p: process(logits, p, seq, 128, [2]))})

    from tests.helpers.tiny_models import make_phi3_folder

    tiny = make_phi3_folder(Path(tempfile.mkdtemp()) / "tiny", "gqa", max_position_embeddings=4096)
    import slmkit
    from slmkit.engine.structured import Constraint, grammar_for

    llm = slmkit.load(tiny, dtype="float32")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
                                                                                      "items": {"type": "string"}}}}
    text, opt = grammar_for(json_schema=schema)
    c = Constraint(text, opt, llm.tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    tl = torch.randn(1, llm.engine.vocab_size)
    first = llm.tokenizer.token_to_id("{") or llm.tokenizer.encode("{", add_special_tokens=False)[-1]
    c.advance(first)
    rows.append({"what": f"JSON-schema mask (vocab {llm.engine.vocab_size})", "ms": per_call_ms(lambda: c.mask(tl))})
    real = slmkit.load("builtin")  # a real 262k-token vocabulary (Gemma 3)
    text, opt = grammar_for(json_schema=schema)
    rc = Constraint(text, opt, real.tokenizer, real.engine.vocab_size, real.engine.eos_token_ids)
    rc.advance(real.tokenizer.encode("{", add_special_tokens=False)[-1])
    rl = torch.randn(1, real.engine.vocab_size)
    rows.append({"what": f"JSON-schema mask (vocab {real.engine.vocab_size}, built-in Gemma 3)",
                 "ms": per_call_ms(lambda: rc.mask(rl), reps=50)})
    small = torch.randn(1, llm.engine.vocab_size, generator=g) * 4
    p = chains["default sampling (T, top-k 40, top-p 0.9)"]
    rows.append({"what": f"default sampling, vocab {llm.engine.vocab_size} (the tiny model's)",
                 "ms": per_call_ms(lambda: process(small, p, [seq[0][:64]], 32, [2]))})
    steps = {"tiny Phi-3 (test model)": decode_step_ms(tiny, dtype="float32")}
    steps["built-in Gemma 3 270M"] = decode_step_ms("builtin")
    if Path(a.phi3).is_dir():
        steps["Phi-3-mini int4 g32"] = decode_step_ms(a.phi3)
    for r in rows:
        for name, ms in steps.items():
            r[f"% of {name} step"] = 100 * r["ms"] / ms
    cols = [("what", "per token", ""), ("ms", "ms", ".3f")] + [(f"% of {n} step", f"% of {n} step ({ms:.1f} ms)",
                                                                 ".1f") for n, ms in steps.items()]
    print_table(rows, cols)
    save_results("decoding", decode_step_ms=steps, rows=rows)


if __name__ == "__main__":
    main()
