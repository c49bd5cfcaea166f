"""Speculative decoding: slmkit plain vs prompt lookup (ngram) vs a draft model, beside llama.cpp's
plain decoding and its own prompt-lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding;
the binding offers no draft-model mode), on the same GGUF file.

    .venv/bin/python benchmarks/speculative.py                    # the built-in model, every task
    .venv/bin/python benchmarks/speculative.py --draft SMALL.gguf # add a draft model (same tokenizer)
    .venv/bin/python benchmarks/speculative.py --quick            # a smoke run: 1 task of each kind

Part 1, real weights (so acceptance is real): input-grounded tasks (summarise, rewrite, extract,
code edit: the answer repeats the prompt) and open-ended prose, greedy, --decode tokens; decode
tok/s (clock after the first token), tokens per forward pass and accepted / drafted tokens. The
slmkit-batch rows run the same tasks through the continuous-batching engine (`slm serve`'s path),
--batch-streams copies of each task at once (default 1: one server stream; 0 skips them); their
tok/s is per stream, the median over the streams.
Part 2, Phi-3-mini size with random weights at int4 (--layers, default 8): the cost of verifying k
drafted tokens (one pass over k + 1 rows) against one plain step, k = 2..8, and the speed-up the
measured acceptance rate gives there: E[tokens per pass] = (1 - a^(k+1)) / (1 - a), over the cost.
Each engine runs in its own process; slmkit's modes share one, interleaved (every rep runs plain,
ngram and draft in turn: "x its own plain" compares runs of the same minutes on this noisy VM).
Prints tables; writes benchmarks/results/speculative.json.
Do not run beside tests or other load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_random_phi3, median, print_table, run_child, save_results  # noqa: E402

_CODE = '''def load_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, qty, price = line.split(",")
            rows.append({"name": name, "qty": int(qty), "price": float(price)})
    return rows


def total(rows):
    return sum(r["qty"] * r["price"] for r in rows)
'''
_ARTICLE = ("The city council met on Tuesday to discuss the new bicycle lanes planned for the river district. "
            "The plan adds twelve kilometres of protected lanes, three new crossings near the market, and a "
            "bicycle parking area beside the central station. Supporters said the lanes would make the district "
            "safer for children riding to school and reduce traffic on the main bridge. Shop owners on Mill Street "
            "worried that removing forty parking spaces would hurt their business, and asked for a delivery zone "
            "in front of the market. The council agreed to add the delivery zone, to build the lanes in two "
            "stages starting next spring, and to count cyclists and cars on the bridge before and after each "
            "stage. The first stage will cost 4.2 million euros, paid in part by a regional transport grant.")
TASKS: dict[str, tuple[str, str]] = {  # name -> (kind, completion prompt for a base model)
    "summarise": ("grounded", f"Article: {_ARTICLE}\n\nThe article again, shortened to its main points:\n"),
    "rewrite": ("grounded", f"Text: {_ARTICLE}\n\nThe same text with every sentence in the past tense kept, "
                            "corrected and copied out exactly:\n"),
    "extract": ("grounded", f"Article: {_ARTICLE}\n\nFacts from the article, one per line, quoting it:\n- "),
    "code_edit": ("grounded", f"# orders.py\n{_CODE}\n# orders.py, with type hints added and nothing else "
                              f"changed:\n"),
    "story": ("prose", "Once upon a time, in a small village at the edge of a great forest, there lived"),
    "essay": ("prose", "The history of the printing press begins in the fifteenth century, when"),
}
QUICK_TASKS = ("summarise", "story")
SLMKIT_MODES = ("none", "ngram", "draft")
LLAMA_MODES = ("plain", "lookup")


# ------------------------------------------------------------------ part 1: real weights
def child_slmkit(path: str, modes: list[str], draft: str | None, tasks: list[str], decode: int, reps: int, k: int,
                 streams: int = 0) -> dict[str, Any]:
    """Every mode on one loaded model, interleaved (each rep runs the modes in turn, so a busy or
    drifting machine slows them alike): {mode: {task: result}}. streams > 0: through continuous
    batching, that many copies of each task at once."""
    import slmkit

    llm = slmkit.load(path)
    extras: dict[str, dict[str, Any]] = {m: {"speculative": m, "num_draft": k} for m in modes}
    if "draft" in extras:
        extras["draft"]["draft"] = slmkit.load(draft) if draft else None
    if streams:
        llm.enable_batching(slots=max(streams, 2), context=2048)
    llm.generate("warm up", max_new_tokens=4, temperature=0, speculative="none")

    def once(prompt: str, extra: dict[str, Any]) -> Any:
        if not streams:
            return llm.generate(prompt, max_new_tokens=decode, temperature=0, **extra)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(streams) as pool:
            got = list(pool.map(lambda _: llm.generate(prompt, max_new_tokens=decode, temperature=0, **extra),
                                range(streams)))
        return sorted(got, key=lambda x: x.timings.decode_tokens_per_s(x.usage.completion_tokens))[streams // 2]

    out: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for name in tasks:
        runs: dict[str, list[Any]] = {m: [] for m in modes}
        for _ in range(reps):
            for m in modes:
                runs[m].append(once(TASKS[name][1], extras[m]))
        for m in modes:
            r = runs[m][-1]
            n, acc = r.usage.completion_tokens, r.usage.accepted_tokens
            out[m][name] = {"decode_tok_s": median([x.timings.decode_tokens_per_s(x.usage.completion_tokens)
                                                    for x in runs[m]]),
                            "tokens": n, "drafted": r.usage.drafted_tokens, "accepted": acc,
                            "tokens_per_pass": n / max(1, n - acc), "text": r.text[:80]}
    return out


def child_llama(path: str, mode: str, tasks: list[str], decode: int, reps: int, k: int, threads: int
                ) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if mode == "lookup" else None
    ref = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, draft_model=draft, verbose=False)
    out = {}
    for name in tasks:
        prompt, speeds, n = TASKS[name][1], [], 0
        for _ in range(reps):
            ref.reset()  # no prompt reuse between runs: both clocks include the prefill, which is subtracted
            t = time.perf_counter()
            ref.create_completion(prompt, max_tokens=1, temperature=0)
            first = time.perf_counter() - t
            ref.reset()
            t = time.perf_counter()
            r = ref.create_completion(prompt, max_tokens=decode, temperature=0)
            full = time.perf_counter() - t
            n = r["usage"]["completion_tokens"]
            speeds.append((n - 1) / (full - first) if n > 1 and full > first else float("nan"))
        out[name] = {"decode_tok_s": median(speeds), "tokens": n}
    return out


# ------------------------------------------------------------------ part 2: verification cost
def child_verify_cost(folder: str, ks: list[int], prompt: int, reps: int) -> dict[str, Any]:
    import slmkit

    eng = slmkit.load(folder, quant="int4").engine  # the kernel path users decode on
    ids = torch.randint(100, 30000, (1, prompt + max(ks) + 1), generator=torch.Generator().manual_seed(0))
    cache = eng.new_cache(1, prompt + max(ks) + 2)
    eng.forward(ids[:, :prompt], cache)
    cost = {}
    for rows in [1] + [k + 1 for k in ks]:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            eng.forward(ids[:, prompt:prompt + rows], cache, last_only=False)
            times.append(time.perf_counter() - t)
            cache.trim(rows)
        cost[rows] = median(times)
    return {"step_s": cost[1], "rows_cost": {str(k): cost[k + 1] / cost[1] for k in ks}}


def expected_per_pass(a: float, k: int) -> float:
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="builtin", help="the GGUF to run (default: the built-in model)")
    ap.add_argument("--draft", default=None, help="a draft model with the same tokenizer (GGUF or folder)")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--num-draft", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--layers", type=int, default=None, help="part 2's random Phi-3-mini depth (default 8: "
                    "the cost ratio of k rows to one barely depends on depth)")
    ap.add_argument("--folder", default="/tmp/slmkit-bench/phi3-mini-random")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 tasks, 16 tokens, 1 rep, 2 layers")
    ap.add_argument("--batch-streams", type=int, default=1, help="streams of each task at once through continuous "
                    "batching, for the slmkit-batch rows (0: skip them)")
    a = ap.parse_args()
    if a.child:
        kw = json.loads(a.args)
        fn = {"slmkit": child_slmkit, "llama": child_llama, "verify": child_verify_cost}[a.child]
        print(json.dumps(fn(**kw)))
        return
    tasks = list(QUICK_TASKS if a.quick else TASKS)
    decode, reps, layers = (16, 1, 2) if a.quick else (a.decode, a.reps, a.layers or 8)
    path = a.model
    if path == "builtin":
        from slmkit.sources.builtin import builtin_model_path

        path = str(builtin_model_path())
    me = Path(__file__).resolve()

    def child(kind: str, **kw: Any) -> dict[str, Any]:
        return run_child(me, [kind, "--args", json.dumps(kw)])

    results: dict[str, dict[str, Any]] = {}
    modes = [m for m in SLMKIT_MODES if m != "draft" or a.draft]
    for prefix, streams in (("slmkit", 0), ("slmkit-batch", a.batch_streams)):
        if prefix == "slmkit-batch" and streams <= 0:
            continue
        got = child("slmkit", path=path, modes=modes, draft=a.draft, tasks=tasks, decode=decode, reps=reps,
                    k=a.num_draft, streams=streams)
        for mode in modes:
            results[f"{prefix}-{mode}"] = got if "error" in got else got[mode]
    for mode in LLAMA_MODES:
        results[f"llama.cpp-{mode}"] = child("llama", path=path, mode=mode, tasks=tasks, decode=decode, reps=reps,
                                             k=a.num_draft, threads=a.threads)
    rows = []
    base = results.get("llama.cpp-plain", {})
    for engine, per_task in results.items():
        if "error" in per_task:
            rows.append({"engine": engine, "task": "-", "error": per_task["error"]})
            continue
        for name in tasks:
            r = dict(per_task[name], engine=engine, task=name, kind=TASKS[name][0])
            ref = base.get(name, {}).get("decode_tok_s") if isinstance(base, dict) and "error" not in base else None
            r["vs_llama_plain"] = r["decode_tok_s"] / ref if ref else None
            own = results.get(engine.rsplit("-", 1)[0] + "-none", {}) if engine.startswith("slmkit") else {}
            own_ref = own.get(name, {}).get("decode_tok_s") if "error" not in own else None
            r["vs_own_plain"] = r["decode_tok_s"] / own_ref if own_ref else None
            rows.append(r)
    print_table(rows, [("task", "task", ""), ("kind", "kind", ""), ("engine", "engine", ""),
                       ("decode_tok_s", "decode tok/s", ".1f"), ("vs_llama_plain", "x llama.cpp plain", ".2f"),
                       ("vs_own_plain", "x its own plain", ".2f"),
                       ("tokens_per_pass", "tok/pass", ".2f"), ("drafted", "drafted", ""),
                       ("accepted", "accepted", ""), ("error", "error", "")])
    # part 2: the verification cost at Phi-3-mini size, and what the measured acceptance gives there
    folder = make_random_phi3(Path(a.folder + (f"-{layers}l" if layers else "")), layers)
    ks = [2, 4, 8] if a.quick else list(range(2, 9))
    cost = child("verify", folder=str(folder), ks=ks, prompt=256, reps=reps)
    ngram = [r for r in rows if r.get("engine") == "slmkit-ngram" and r.get("drafted")]
    grounded = [r for r in ngram if r["kind"] == "grounded"]
    rate = sum(r["accepted"] for r in grounded) / max(1, sum(r["drafted"] for r in grounded))
    proj = []
    if "error" not in cost:
        for k in ks:
            c = cost["rows_cost"][str(k)]
            proj.append({"k": k, "cost": c, "accept_rate": rate, "speedup": expected_per_pass(rate, k) / c})
        print(f"\nPhi-3-mini ({layers} layers, random weights, int4): one step {cost['step_s'] * 1e3:.1f} ms; "
              f"verification of k drafts costs (x one step), and the speed-up at the measured acceptance "
              f"rate {rate:.2f} (input-grounded tasks, prompt lookup):")
        print_table(proj, [("k", "k", ""), ("cost", "cost x", ".2f"), ("speedup", "speed-up", ".2f")])
    else:
        print(f"\nverification cost: {cost['error']}")
    save_results("speculative_quick" if a.quick else "speculative", model=path, draft=a.draft, decode=decode, reps=reps,
                 batch_streams=a.batch_streams,
                 quick=a.quick, rows=rows, verify_cost=cost, projection=proj)


if __name__ == "__main__":
    main()
