"""The built-in model's decode speed (Gemma 3 270M Q4_K_M), slmkit vs llama.cpp on the same file;
or any GGUF file's (--model: Phi-3 files run their own fused step).

    .venv/bin/python benchmarks/builtin_decode.py                # 5 rounds of 128 greedy tokens
    .venv/bin/python benchmarks/builtin_decode.py --profile      # + where one decode step's time goes
    .venv/bin/python benchmarks/builtin_decode.py --model /tmp/slmkit-bench/phi3-mini-random-16l-Q4_K_M.gguf
    .venv/bin/python benchmarks/builtin_decode.py --model FILE --prefill 512   # prefill tok/s instead

One process, rounds interleaved (slmkit fused step, slmkit per-op step, llama-cpp-python), so a
busy machine slows every engine alike; medians over rounds, and the best round of each (on a
busy machine the best rounds are the ones nothing else ran in). Decode tok/s excludes the prefill
(slmkit's timings; llama.cpp: a 1-token run's time subtracted). --profile times one step's parts
with time.perf_counter: the layers (fused: the one kernel call; per-op: forward hooks on each
module, which add their own overhead), the output head, the embedding and the rest, medians over
steps (the built-in model only). --prefill N: rounds of one N-token prompt's forward pass instead
(the same random token ids for both engines, a fresh cache each; llama.cpp's prompt in one batch).
Writes benchmarks/results/builtin_decode.json (--model: decode_<file stem>.json; --prefill:
prefill_<file stem>.json). Do not run beside tests or other load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, print_table, save_results  # noqa: E402

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


def slmkit_round(llm: Any, fused_step: bool, decode: int) -> float:
    from slmkit.kernels import fused

    fused.fused_decode_enabled = fused_step
    r = llm.generate(PROMPT, max_new_tokens=decode, temperature=0, ignore_eos=True, speculative="none")
    return r.timings.decode_tokens_per_s(r.usage.completion_tokens)


def llama_round(ref: Any, decode: int) -> float:
    ref.reset()
    t = time.perf_counter()
    ref.create_completion(PROMPT, max_tokens=1, temperature=0)
    first = time.perf_counter() - t
    ref.reset()
    t = time.perf_counter()
    r = ref.create_completion(PROMPT, max_tokens=decode, temperature=0, logit_bias={ref.token_eos(): -1e9})
    full = time.perf_counter() - t
    n = r["usage"]["completion_tokens"]
    return (n - 1) / (full - first) if n > 1 and full > first else float("nan")


def decode_rounds(llm: Any, ref: Any, decode: int, rounds: int) -> dict[str, list[float]]:
    """Decode tok/s: slmkit's fused step, its per-op step, then llama.cpp, interleaved rounds."""
    speeds: dict[str, list[float]] = {"slmkit (fused step)": [], "slmkit (per-op step)": [], "llama.cpp": []}
    for i in range(rounds):
        speeds["slmkit (fused step)"].append(slmkit_round(llm, True, decode))
        speeds["slmkit (per-op step)"].append(slmkit_round(llm, False, decode))
        if ref is not None:
            speeds["llama.cpp"].append(llama_round(ref, decode))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items() if v), flush=True)
    return speeds


def prefill_rounds(llm: Any, ref: Any, n: int, rounds: int) -> dict[str, list[float]]:
    """tok/s of an n-token prompt's forward pass, slmkit then llama.cpp, interleaved rounds."""
    ids = torch.randint(100, 30000, (1, n), generator=torch.Generator().manual_seed(0))
    eng = llm.engine
    speeds: dict[str, list[float]] = {"slmkit": [], "llama.cpp": []}
    with torch.inference_mode():
        eng.forward(ids[:, :8], eng.new_cache(1, 16))
        for i in range(rounds):
            cache = eng.new_cache(1, n + 1)
            t = time.perf_counter()
            eng.forward(ids, cache)
            speeds["slmkit"].append(n / (time.perf_counter() - t))
            if ref is not None:
                ref.reset()
                t = time.perf_counter()
                ref.eval(ids[0].tolist())
                speeds["llama.cpp"].append(n / (time.perf_counter() - t))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items() if v), flush=True)
    return speeds


def profile(llm: Any, steps: int, stat: Any = median) -> dict[str, dict[str, float]]:
    """ms per part of one decode step (stat over `steps`: median, or min on a busy machine), fused
    and per-op."""
    from slmkit.kernels import fused

    eng, model = llm.engine, llm.engine.model
    ids = eng.tokenizer.encode(PROMPT)
    out: dict[str, dict[str, float]] = {}
    for name, on in (("fused", True), ("per-op", False)):
        fused.fused_decode_enabled = on
        parts: dict[str, list[float]] = {}
        marks: dict[str, float] = {}

        def timed(key: str, mod: torch.nn.Module, marks: dict[str, float] = marks,
                  parts: dict[str, list[float]] = parts) -> list[Any]:
            def pre(*_: Any) -> None:
                marks[key] = time.perf_counter()

            def post(*_: Any) -> None:
                parts.setdefault(key, []).append(time.perf_counter() - marks[key])
            return [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

        hooks = timed("embedding", model.model.embed_tokens) + timed("output head", model.lm_head)
        if not on:
            for layer in model.model.layers:
                for key, mod in (("layers", layer), ("  attention block", layer.self_attn), ("  mlp block", layer.mlp)):
                    hooks += timed(key, mod)
        real = fused.gemma3_decode

        def step_timed(*a: Any, **k: Any) -> bool:
            t = time.perf_counter()
            ran = real(*a, **k)
            parts.setdefault("layers", []).append(time.perf_counter() - t)
            return ran

        fused.gemma3_decode = step_timed  # type: ignore[assignment]
        cache = eng.new_cache(1, len(ids) + steps + 8)
        totals = []
        with torch.inference_mode():
            tok = int(eng.forward(torch.tensor([ids]), cache)[0, -1].argmax())
            for p in parts.values():
                p.clear()
            for _ in range(steps):
                t = time.perf_counter()
                tok = int(eng.forward(torch.tensor([[tok]]), cache)[0, -1].argmax())
                totals.append(time.perf_counter() - t)
        fused.gemma3_decode = real  # type: ignore[assignment]
        for h in hooks:
            h.remove()
        n = len(model.model.layers)
        per_step = {key: [sum(v[i * n:(i + 1) * n]) if len(v) == n * steps else v[i] for i in range(steps)]
                    for key, v in parts.items()}
        row = {key: stat(v) * 1e3 for key, v in per_step.items()}
        step = row["step (forward + argmax)"] = stat(totals) * 1e3
        row["rest"] = step - sum(v for k, v in row.items() if not k.startswith(("  ", "step")))
        out[name] = row
    fused.fused_decode_enabled = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--best", action="store_true", help="profile: each part's minimum (a busy machine)")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the built-in model's)")
    ap.add_argument("--prefill", type=int, default=0, help="time an N-token prompt's prefill instead of decode")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import slmkit
    from slmkit.sources.builtin import builtin_model_path

    path = a.model or str(builtin_model_path())
    if a.profile and a.model:
        ap.error("--profile times the built-in model's step only")
    llm = slmkit.load(path)
    llm.generate("warm up", max_new_tokens=4, temperature=0)
    ref = None
    if not a.no_llama:
        import llama_cpp

        n_batch = max(512, a.prefill)
        ref = llama_cpp.Llama(model_path=path, n_ctx=max(2048, a.prefill + 16), n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
        ref.create_completion("warm up", max_tokens=4, temperature=0)
    speeds = prefill_rounds(llm, ref, a.prefill, a.rounds) if a.prefill else decode_rounds(llm, ref, a.decode, a.rounds)
    what = "prefill_tok_s" if a.prefill else "decode_tok_s"
    rows = [{"engine": k, what: median(v), "best_tok_s": max(v), "runs": [round(x, 1) for x in v]}
            for k, v in speeds.items() if v]
    llama = median(speeds["llama.cpp"]) if speeds["llama.cpp"] else None
    for r in rows:
        r["vs_llama"] = r[what] / llama if llama else None
        r["best_vs_llama"] = r["best_tok_s"] / max(speeds["llama.cpp"]) if llama else None
    print()
    print_table(rows, [("engine", "engine", ""), (what, what.replace("_tok_s", " tok/s"), ".1f"),
                       ("vs_llama", "x llama.cpp", ".2f"), ("best_tok_s", "best tok/s", ".1f"),
                       ("best_vs_llama", "best x llama.cpp", ".2f")])
    prof = profile(llm, 64, min if a.best else median) if a.profile else None
    if prof:
        print(f"\nms per decode step ({'minimum' if a.best else 'median'}s):")
        for name, row in prof.items():
            print(f"  {name}: " + ", ".join(f"{k.strip()} {v:.2f}" for k, v in row.items()))
    name = "builtin_decode" if not a.model else f"decode_{Path(a.model).stem}"
    if a.prefill:
        name = f"prefill_{Path(path).stem}"
    save_results(name, model=path, decode_tokens=0 if a.prefill else a.decode, prefill_tokens=a.prefill,
                 rounds=a.rounds, threads=a.threads,
                 rows=rows, profile_ms=prof, profile_stat="min" if a.best else "median")


if __name__ == "__main__":
    main()
