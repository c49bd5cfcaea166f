"""`slm serve` under concurrent streaming users: aggregate generated tokens/s and time to first token.

    .venv/bin/python benchmarks/serve.py [--model /tmp/slmkit-bench/phi3-mini-random-int4-g32]

`slm serve` runs in its own process, as users run it (continuous batching, 16 slots of 512 tokens;
by default it serves the same Q4_0 GGUF as llama-server);
1, 4, 8 and 16 clients each stream a chat completion (different ~40-token prompts, 64 tokens,
greedy) through httpx at the same time. The floor is the same server with one slot (requests one
at a time, as Ollama serves a model by default). With --llama-server (a llama-server binary,
built with cmake from the llama.cpp sources vendored in the llama-cpp-python sdist) and --gguf,
llama-server (-np 16, continuous batching, 2 threads) and slmkit both serve that GGUF file too.
Prints a table, writes results/serve.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402

TOKENS = 64


def launch(cmd: list[str], what: str, log: Path | None = None) -> tuple[str, object]:
    """Run a server command (its port appended as --port P) and wait until /health answers; its
    output goes to `log` (a file) when given."""
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # the child keeps its own copy
    try:
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=out, stderr=subprocess.STDOUT if log else out)
    finally:
        if log is not None:
            out.close()
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(base + "/health").status_code == 200:
                return base, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def start(model: str, slots: int):
    """`slm serve` in its own process, as users run it (clients here do not share its GIL)."""
    return launch([sys.executable, "-m", "slmkit.cli", "serve", f"m={model}", "--slots", str(slots),
                   "--slot-context", "512", "--max-queue", "64"], "slm serve")


def one(base: str, i: int, out: list, tag: str) -> None:
    import httpx

    body = {"model": "m", "max_tokens": TOKENS, "temperature": 0, "stream": True, "min_tokens": TOKENS,
            "ignore_eos": True,  # llama-server's name for running to max_tokens
            "stream_options": {"include_usage": True}, "logprobs": True,  # an event for every token
            "messages": [{"role": "user",
                          "content": f"{tag}: user {i} asks about topic {i * 7}: " + "tell me more " * 8}]}
    t0 = time.perf_counter()
    ttft, n = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and (chunk["choices"][0].get("logprobs") or
                                           chunk["choices"][0].get("delta", {}).get("content")):
                ttft = time.perf_counter() - t0 if ttft is None else ttft
    out[i] = (ttft or 0.0, n, time.perf_counter() - t0)


def run(base: str, users: int, tag: str) -> dict:
    """`users` streams at once; `tag` makes every prompt new to the server (no prompt-cache hits
    beyond the chat template's shared start), for slmkit and llama-server alike."""
    out: list = [None] * users
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(base, i, out, tag)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(o[0] for o in out)
    return {"streams": users, "tokens": sum(o[1] for o in out), "wall_s": wall,
            "aggregate_tok_s": sum(o[1] for o in out) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def llama_server(binary: str, gguf: str, slots: int):
    return launch([binary, "-m", gguf, "-np", str(slots), "-c", str(512 * slots), "-t", "2", "-tb", "2",
                   "--host", "127.0.0.1"], "llama-server")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/slmkit-bench/phi3-mini-random-Q4_0.gguf",
                    help="what slmkit serves (default: the same Q4_0 GGUF as llama-server)")
    ap.add_argument("--gguf", default="/tmp/slmkit-bench/phi3-mini-random-Q4_0.gguf")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary")
    ap.add_argument("--slots", type=int, default=16)
    a = ap.parse_args()

    rows = []
    what = Path(a.model).name
    runs = [(f"slmkit {what}, one at a time (Ollama-style floor)", a.model, 1, (1, 4)),
            (f"slmkit {what}, continuous batching", a.model, a.slots, (1, 4, 8, 16))]
    if a.llama_server and Path(a.gguf).is_file():
        runs += [(f"llama-server {Path(a.gguf).name}, -np {a.slots}", None, a.slots, (1, 4, 8, 16))]
    for mode, model, slots, users_list in runs:
        if model is None:
            base, proc = llama_server(a.llama_server, a.gguf, slots)
        else:
            base, proc = start(model, slots)
        run(base, 1, "Warm-up")
        for users in users_list:
            r = run(base, users, f"Run of {users}")
            r["server"] = mode
            rows.append(r)
            print(r, flush=True)
        proc.terminate()
        proc.wait(timeout=30)
    singles = {r["server"]: r["aggregate_tok_s"] for r in rows if r["streams"] == 1}
    for r in rows:
        r["x_single"] = r["aggregate_tok_s"] / singles[r["server"]]
    print_table(rows, [("server", "server", ""), ("streams", "streams", ""), ("aggregate_tok_s", "tok/s", ".2f"),
                       ("x_single", "x its single stream", ".2f"), ("ttft_p50_s", "TTFT p50 s", ".2f"),
                       ("ttft_p95_s", "TTFT p95 s", ".2f")])
    save_results("serve", model=a.model, gguf=a.gguf, tokens_per_stream=TOKENS, rows=rows)


if __name__ == "__main__":
    main()
