"""`slm compare MODEL MODEL ... -p PROMPT`: one prompt (or `--suite small`'s fixed prompts) across
several models, any string slmkit.load takes (paths, builtin, transformers:, mlx:, github:, ...).
Side by side: the answers, time to first token, decode tokens/s, peak memory, and the cost per 1M
tokens where the provider publishes one. A terminal table, `--json`, and `--plot out.png`.

Each model runs alone in a subprocess of its own (`python -m slmkit.cli_compare --worker`, a JSON
job on stdin, a JSON result on stdout), one after the other: its peak RSS (ru_maxrss) is then that
model's alone, interpreter and libraries included (`rss_before_load_bytes` says how much of it
they were), and no model's timings overlap another's. For a cloud model it is the client's memory.

Timings: TTFT is from the request to the first piece of text (a cloud's network included; the
first request of a fresh process unless --warmup answers 2 tokens of the first prompt before);
tokens/s is (completion tokens - 1) / (time from the first piece to the last), the decode rate;
completion tokens are the backend's usage (a cloud's own count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, SlmkitError

# ------------------------------------------------------------------ prompts
LONG_CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Perth", "Montreal", "Accra", "Hanoi", "Bergen"]
LONG_ITEMS = ["copper wire", "olive oil", "bicycle tyres", "rice", "glass jars", "wool", "solar panels", "tea"]


def long_document() -> str:
    """A fixed ~40-entry shipping log (about 1,000 tokens) and a question whose answer is in it:
    a long-context read, not recall. The numbers are fixed (no randomness), so runs compare."""
    lines = []
    for i in range(40):
        city, item = LONG_CITIES[(i * 7) % len(LONG_CITIES)], LONG_ITEMS[(i * 3) % len(LONG_ITEMS)]
        crates = 40 + (i * 37) % 113 + (400 if i == 27 else 0)  # entry 28 stands out
        lines.append(f"Entry {i + 1}: the warehouse in {city} shipped {crates} crates of {item} on day {i + 3}.")
    return ("Read this shipping log.\n\n" + "\n".join(lines) +
            "\n\nWhich entry shipped the most crates, from which city, and of what?")


SUITES: dict[str, list[tuple[str, str]]] = {
    "small": [
        ("reasoning", "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. "
                      "How much does the ball cost? Explain step by step."),
        ("code", "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."),
        ("multilingual", "Translate into French, Spanish and German: 'The library opens at nine tomorrow.'"),
        ("long-document", long_document()),
    ],
}

# ------------------------------------------------------------------ prices
# USD per 1M tokens (input, output): Azure AI Foundry serverless (pay-as-you-go) list prices for the
# Phi models, as published on the Azure pricing page (2024-2025; check it before relying on them).
AZURE_PRICES: dict[str, tuple[float, float]] = {
    "phi-3-mini-4k-instruct": (0.13, 0.52), "phi-3-mini-128k-instruct": (0.13, 0.52),
    "phi-3.5-mini-instruct": (0.13, 0.52), "phi-3.5-vision-instruct": (0.13, 0.52),
    "phi-3-small-8k-instruct": (0.15, 0.60), "phi-3-small-128k-instruct": (0.15, 0.60),
    "phi-3-medium-4k-instruct": (0.17, 0.68), "phi-3-medium-128k-instruct": (0.17, 0.68),
    "phi-3.5-moe-instruct": (0.16, 0.64),
}


def price(model: str) -> tuple[tuple[float, float] | None, str]:
    """((input, output) USD per 1M tokens, or None; a note) for a model string."""
    from .backends.registry import split_spec

    provider, target = split_spec(model)
    name = target.rsplit("/", 1)[-1].split("@", 1)[0].lower()
    if provider == "azure" and name in AZURE_PRICES:
        return AZURE_PRICES[name], "Azure serverless list price"
    if provider == "github":
        return (0.0, 0.0), "GitHub Models free tier (rate-limited)"
    if provider in ("azure", "nim", "openai"):
        return None, "no published per-token price here"
    return None, "local"


# ------------------------------------------------------------------ the worker (one model, its own process)
def _peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _run_prompt(llm: Any, prompt: dict, options: dict) -> dict:
    content: Any = prompt["text"]
    if prompt.get("images"):
        content = [*({"type": "image_url", "image_url": {"url": p}} for p in prompt["images"]),
                   {"type": "text", "text": prompt["text"]}]
    t0 = time.perf_counter()
    first = None
    pieces: list[str] = []
    last = None
    if llm.prompt_style == "chat":
        chunks = llm.chat([{"role": "user", "content": content}], stream=True, **options)
    else:
        chunks = llm.generate(prompt["text"], stream=True, **options)
    for chunk in chunks:
        if first is None and chunk.text:
            first = time.perf_counter()
        pieces.append(chunk.text)
        last = chunk
    end = time.perf_counter()
    usage = last.usage if last is not None else None
    tokens = usage.completion_tokens if usage is not None and usage.completion_tokens else None
    rate = (tokens - 1) / (end - first) if tokens and tokens > 1 and first is not None and end > first else None
    return {"prompt": prompt["name"], "answer": "".join(pieces), "ttft_s": None if first is None else first - t0,
            "tokens_per_s": rate, "total_s": end - t0, "completion_tokens": tokens,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "finish_reason": last.finish_reason if last is not None else None, "error": None}


def worker(job: dict) -> dict:
    """Load job["model"] and answer each of job["prompts"]; what compare reports for that model."""
    from .api import load

    out: dict[str, Any] = {"model": job["model"], "rss_before_load_bytes": _peak_rss()}
    t0 = time.perf_counter()
    try:
        llm = load(job["model"], **job.get("load", {}))
    except SlmkitError as e:
        return {**out, "error": str(e), "results": [], "peak_rss_bytes": _peak_rss()}
    out.update(backend=llm.capabilities.backend, load_s=time.perf_counter() - t0, results=[])
    if job.get("warmup") and job["prompts"]:  # one-time costs (lazy init, first-call compilation) not timed
        t0 = time.perf_counter()
        try:
            _run_prompt(llm, job["prompts"][0], {**job.get("options", {}), "max_new_tokens": 2})
        except SlmkitError:
            pass  # the measured run reports it
        out["warmup_s"] = time.perf_counter() - t0
    for prompt in job["prompts"]:
        try:
            out["results"].append(_run_prompt(llm, prompt, job.get("options", {})))
        except SlmkitError as e:  # e.g. the long document outgrows a small context: that prompt fails alone
            out["results"].append({"prompt": prompt["name"], "answer": "", "error": str(e)})
    out["peak_rss_bytes"] = _peak_rss()
    out["error"] = None
    return out


def run_model(job: dict, timeout: float | None) -> dict:
    """job in a fresh interpreter; its result, or {"error": ...} saying why there is none."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # this slmkit, even where it is not installed
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "slmkit.cli_compare", "--worker"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": job["model"], "error": f"did not finish within --timeout {timeout:g} s", "results": []}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        if isinstance(result, dict):
            return result
    except (IndexError, json.JSONDecodeError):
        pass
    why = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"model": job["model"], "results": [],
            "error": f"its process failed (exit {proc.returncode}): {why[-1] if why else 'no output'}"}


# ------------------------------------------------------------------ the report
def compare(models: list[str], prompts: list[dict], *, options: dict, load: dict,
            timeout: float | None = None, warmup: bool = False) -> dict:
    """Every model on every prompt, one model at a time; the JSON report."""
    report: dict[str, Any] = {"prompts": prompts, "options": options, "warmup": warmup, "models": [],
                              "memory": "peak RSS of a subprocess per model (ru_maxrss; interpreter and "
                                        "libraries included, rss_before_load_bytes is their share)"}
    for model in models:
        r = run_model({"model": model, "prompts": prompts, "options": options, "load": load, "warmup": warmup},
                      timeout)
        per_1m, note = price(model)
        r["cost_per_1m"] = None if per_1m is None else {"input": per_1m[0], "output": per_1m[1]}
        r["cost_note"] = note
        for res in r.get("results", []):
            if per_1m is not None and res.get("completion_tokens") is not None and res.get("prompt_tokens") is not None:
                res["cost_usd"] = (res["prompt_tokens"] * per_1m[0] + res["completion_tokens"] * per_1m[1]) / 1e6
            else:
                res["cost_usd"] = None
        report["models"].append(r)
    return report


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cost(m: dict) -> str:
    c = m.get("cost_per_1m")
    if c is None:
        return "-"
    return "free tier" if c["input"] == c["output"] == 0 else f"${c['input']:g} in / ${c['output']:g} out"


def render_table(report: dict, width: int = 100) -> str:
    """Per prompt: each model's answer, then a table of the numbers."""
    out = []
    for i, prompt in enumerate(report["prompts"]):
        text = prompt["text"].replace("\n", " ")
        out.append(f"== {prompt['name']}: {text[:width - 8] + '...' if len(text) > width - 5 else text}")
        for m in report["models"]:
            res = m["results"][i] if i < len(m.get("results", [])) else None
            answer = m["error"] if m.get("error") else (res["error"] or res["answer"].strip()) if res else ""
            out.append(f"-- {m['model']}{' (error)' if m.get('error') or (res and res['error']) else ''}:")
            out.append(answer or "(no text)")
        out.append("")
    from .cli_compare_plot import model_values

    head = ["model", "load s", "TTFT s", "tok/s", "peak RSS", "$ per 1M tokens"]
    rows = [head]
    for m in report["models"]:
        v = model_values(m)
        rows.append([m["model"], _num(m.get("load_s"), ".2f"), _num(v["ttft"], ".3f"), _num(v["rate"], ".1f"),
                     "-" if v["rss"] is None else f"{v['rss']:.2f} GiB", _cost(m)])
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(head))]
    for n, row in enumerate(rows):
        out.append("  ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w)
                             for c, (v, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if len(report["prompts"]) > 1:
        out.append("(TTFT and tok/s: means over the prompts that succeeded)")
    return "\n".join(out)


# ------------------------------------------------------------------ the CLI
def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="one prompt (or a suite) across several models, side by side")
    p.add_argument("models", nargs="+", help="model strings as for slm run / slmkit.load (paths, builtin, "
                   "transformers:./dir, mlx:./dir, github:microsoft/Phi-3.5-mini-instruct, ...)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", "-p", help="the prompt every model answers")
    what.add_argument("--suite", choices=sorted(SUITES), help="fixed prompts: reasoning, code, multilingual, "
                      "a long document")
    p.add_argument("--image", action="append", default=None, metavar="PATH", help="an image with the prompt "
                   "(repeatable; vision models)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per answer (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, so runs repeat")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="also draw a bar chart of TTFT, tok/s and "
                   "peak memory per model (Pillow)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one model may take, load included")
    p.add_argument("--warmup", action="store_true", help="answer the first prompt briefly (2 tokens) before "
                   "timing, so one-time costs of a fresh process are not in TTFT")


def cmd_compare(a: argparse.Namespace) -> int:
    from .backends.registry import split_spec
    from .options import GenerationOptions

    for model in a.models:  # a malformed string ("github:") is an error before any model runs
        split_spec(model)
    if a.suite and a.image:
        raise InvalidRequestError("goes with --prompt, not --suite", param="--image")
    GenerationOptions.from_kwargs(max_new_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)  # checked now
    images = []
    if a.image:
        from .cli_vision import image_part

        images = [str(Path(image_part(path, i)["image_url"]["url"]).resolve()) for i, path in enumerate(a.image)]
    if a.plot:
        from .cli_compare_plot import check_writable

        check_writable(a.plot)
    prompts = ([{"name": name, "text": text, "images": []} for name, text in SUITES[a.suite]] if a.suite
               else [{"name": "prompt", "text": a.prompt, "images": images}])
    options = {"max_new_tokens": a.max_tokens, "temperature": a.temperature}
    if a.seed is not None:
        options["seed"] = a.seed
    report = compare(a.models, prompts, options=options, load={"dtype": a.dtype}, timeout=a.timeout,
                     warmup=a.warmup)
    sys.stdout.write((json.dumps(report, indent=2) if a.json else render_table(report)) + "\n")
    if a.plot:
        from .cli_compare_plot import plot

        plot(report, a.plot)
        sys.stderr.write(f"[chart written to {a.plot}]\n")
    failed = [m for m in report["models"] if m.get("error")]
    for m in failed:
        sys.stderr.write(f"error: {m['model']}: {m['error']}\n")
    return 1 if failed else 0


def _worker_main() -> int:
    job = json.loads(sys.stdin.read())
    result = worker(job)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
