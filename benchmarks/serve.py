"""`slm serve` under concurrent streaming users: aggregate generated tokens/s and time to first token,
beside the same model in process and beside llama-server, in one run.

    .venv/bin/python benchmarks/serve.py [--llama-server PATH] [--streams 1,8,16]
    .venv/bin/python benchmarks/serve.py --quick      # a 2-layer file, few tokens: checks that it runs

`slm serve` runs in its own process, as users run it (continuous batching, 16 slots of 512 tokens;
by default it serves the same Q4_0 GGUF as llama-server, a 16-layer Phi-3-mini-shaped file with
random weights, built here with llama.cpp's quantizer when missing: --layers N);
1, 8 and 16 clients each stream a chat completion (different ~40-token prompts, 64 tokens,
greedy) through httpx at the same time. "in process" is one stream of the same request through
LLM.chat(stream=True) in a process of its own (the number a server's single stream should reach).
The floor is the same server with one slot (requests one at a time, as Ollama serves a model by
default). With --llama-server (a llama-server binary, built with cmake from the llama.cpp sources
vendored in the llama-cpp-python sdist), llama-server (-np slots, continuous batching, 2 threads)
serves that GGUF file too. Prints a table, writes results/serve.json.
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
DEFAULT_GGUF = "/tmp/slmkit-bench/phi3-mini-random-Q4_0.gguf"  # 16 layers


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


def message(tag: str, i: int) -> list[dict]:
    return [{"role": "user", "content": f"{tag}: user {i} asks about topic {i * 7}: " + "tell me more " * 8}]


def one(base: str, i: int, out: list, tag: str) -> None:
    import httpx

    body = {"model": "m", "max_tokens": TOKENS, "temperature": 0, "stream": True, "min_tokens": TOKENS,
            "ignore_eos": True,  # llama-server's name for running to max_tokens
            "stream_options": {"include_usage": True}, "logprobs": True,  # an event for every token
            "messages": message(tag, i)}
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


def in_process(model: str, tokens: int) -> dict:
    """One stream of the benchmark's request through LLM.chat(stream=True) in this process (a child
    of the benchmark's), timed as a client times the server: tokens / wall time from the call."""
    import torch

    import slmkit

    torch.set_num_threads(2)
    llm = slmkit.load(model)
    opts = slmkit.GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, ignore_eos=True,
                                    logprobs=True)
    for _ in llm.chat(message("Warm-up", 0), stream=True, options=opts):
        pass
    t0 = time.perf_counter()
    ttft, n = None, 0
    for chunk in llm.chat(message("Run of 1", 0), stream=True, options=opts):
        ttft = time.perf_counter() - t0 if ttft is None else ttft
        n += len(chunk.token_ids)
    wall = time.perf_counter() - t0
    return {"streams": 1, "tokens": n, "wall_s": wall, "aggregate_tok_s": n / wall, "ttft_p50_s": ttft,
            "ttft_p95_s": ttft}


def measure(base: str, users_list: tuple[int, ...], label: str) -> list[dict]:
    """A warm-up request, then `run` at each concurrency; rows labelled with the server."""
    run(base, 1, "Warm-up")
    rows = []
    for users in users_list:
        r = {**run(base, users, f"Run of {users}"), "server": label}  # the same prompts for every server
        rows.append(r)
        print(r, flush=True)
    return rows


def quick_file(layers: int) -> str:
    """A Phi-3-mini-shaped Q4_0 GGUF of `layers` layers (random weights), built once with llama.cpp's quantizer."""
    from common import make_random_phi3
    from gguf_load import make_f16_gguf, quantize

    folder = make_random_phi3(Path(f"/tmp/slmkit-bench/phi3-mini-random-{layers}l"), layers)
    return str(quantize(make_f16_gguf(folder, folder.parent / f"{folder.name}-F16.gguf"), "Q4_0"))


def main() -> None:
    global TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="what slmkit serves (default: the same Q4_0 GGUF as llama-server)")
    ap.add_argument("--gguf", default=None, help=f"the GGUF llama-server serves (default {DEFAULT_GGUF})")
    ap.add_argument("--layers", type=int, default=None, help="build and serve a Q4_0 file of this many layers")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--streams", default="1,8,16", help="concurrent streams per measurement")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per stream")
    ap.add_argument("--no-floor", action="store_true", help="skip the one-slot server")
    ap.add_argument("--quick", action="store_true", help="a 2-layer file, 8 tokens, 1 and 2 streams: checks it runs")
    ap.add_argument("--in-process", default=None, help=argparse.SUPPRESS)  # the child that measures in process
    a = ap.parse_args()
    if a.quick:
        a.layers, a.tokens, a.streams, a.slots = a.layers or 2, 8, "1,2", 4
    TOKENS = a.tokens
    if a.in_process:
        print(json.dumps(in_process(a.in_process, a.tokens)))
        return
    gguf = a.gguf or (quick_file(a.layers) if a.layers else DEFAULT_GGUF)
    model = a.model or gguf
    streams = tuple(int(x) for x in a.streams.split(","))

    rows = []
    what = Path(model).name
    import subprocess

    child = subprocess.run([sys.executable, __file__, "--in-process", model, "--tokens", str(a.tokens)],
                           capture_output=True, text=True)
    if child.returncode == 0:
        rows.append({**json.loads(child.stdout.strip().splitlines()[-1]), "server": f"slmkit {what}, in process"})
    else:
        print(f"in process failed: {child.stderr.strip()[-500:]}", flush=True)
    runs = [] if a.no_floor else [(f"slmkit {what}, one at a time (Ollama-style floor)", model, 1, streams[:2])]
    runs += [(f"slm serve {what}, continuous batching", model, a.slots, streams)]
    if a.llama_server and Path(gguf).is_file():
        runs += [(f"llama-server {Path(gguf).name}, -np {a.slots}", None, a.slots, streams)]
    for mode, served, slots, users_list in runs:
        if served is None:
            base, proc = llama_server(a.llama_server, gguf, slots)
        else:
            base, proc = start(served, slots)
        rows += measure(base, users_list, mode)
        proc.terminate()
        proc.wait(timeout=30)
    singles = {r["server"]: r["aggregate_tok_s"] for r in rows if r["streams"] == 1}
    inproc = next((r["aggregate_tok_s"] for r in rows if r["server"].endswith("in process")), None)
    peer = {r["streams"]: r["aggregate_tok_s"] for r in rows if r["server"].startswith("llama-server")}
    for r in rows:
        r["x_single"] = r["aggregate_tok_s"] / singles[r["server"]] if r["server"] in singles else None
        r["x_in_process"] = r["aggregate_tok_s"] / inproc if inproc and r["streams"] == 1 else None
        r["x_llama_server"] = r["aggregate_tok_s"] / peer[r["streams"]] if r["streams"] in peer else None
    print_table(rows, [("server", "server", ""), ("streams", "streams", ""), ("aggregate_tok_s", "tok/s", ".2f"),
                       ("x_single", "x its single stream", ".2f"), ("x_in_process", "x in process", ".2f"),
                       ("x_llama_server", "x llama-server", ".2f"), ("ttft_p50_s", "TTFT p50 s", ".2f"),
                       ("ttft_p95_s", "TTFT p95 s", ".2f")])
    save_results("serve" if not a.quick else "serve-quick", model=model, gguf=gguf, tokens_per_stream=TOKENS,
                 rows=rows)


if __name__ == "__main__":
    main()
