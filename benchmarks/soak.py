"""Soak: `slm serve` under N streaming clients with random disconnects; every completed greedy
stream is then replayed alone and compared token for token (batch invariance), and the server's
memory, threads and open descriptors are compared before and after.

    .venv/bin/python benchmarks/soak.py                          # built-in model, 16 clients, 5 min
    .venv/bin/python benchmarks/soak.py --seconds 20 --clients 4 # smoke check
    MODEL=./phi35-int4 .venv/bin/python benchmarks/soak.py --quant none

`slm serve` runs in its own process on 127.0.0.1 (continuous batching, --slots slots). Each client
loops until the deadline: a random request from a seeded generator -- /v1/chat/completions (a
shared system prompt or a follow-up turn of its own last conversation, so kept-slot prefixes are
reused) or /v1/completions, greedy or sampled, 8 to --max-tokens tokens -- streamed, and with
probability --disconnect dropped after a random number of events. Completed greedy streams are
then sent again one at a time (each alone in the server) and compared: chat by the (token,
logprob) of every event, completions by the text of every event. Only loopback traffic; every loop
is bounded (deadline, max_tokens, client timeouts, at most --max-replays replays). Prints a table,
writes results/soak.json (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402
from serve import launch  # noqa: E402

WORDS = ("the a river mountain city music history science light water stone garden winter summer "
         "old new small great quiet bright story letter journey market bridge forest library night "
         "morning friend teacher machine number question answer reason because while after").split()
SYSTEMS = ["You are a helpful assistant. Answer briefly.", "You are a poet. Reply in two lines.",
           "You explain things to children, simply and kindly."]
OPENINGS = ["Once upon a time", "The report concluded that", "In the year 1900,", "def main():\n    "]
TIMEOUT = 300  # seconds a single request may take (the server may be busy with 16 others)


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


class Client:
    """One simulated user: its own seeded generator and its last conversation (for follow-ups)."""

    def __init__(self, base: str, seed: int, a: argparse.Namespace, stats: dict, lock: threading.Lock):
        self.base, self.a, self.stats, self.lock = base, a, stats, lock
        self.rng = random.Random(seed)
        self.history: list[dict] | None = None
        self.greedy: list[tuple[str, dict, list]] = []  # (route, body, events) of completed greedy streams

    def request(self) -> tuple[str, dict]:
        rng, a = self.rng, self.a
        body: dict = {"model": "m", "max_tokens": rng.randint(8, a.max_tokens), "stream": True}
        if rng.random() < a.greedy:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95)
        if rng.random() < a.chat:
            if self.history and rng.random() < 0.4:  # the next turn of the last conversation
                messages = self.history + [{"role": "user", "content": words(rng, 3, 12) + "?"}]
            else:
                messages = [{"role": "system", "content": rng.choice(SYSTEMS)},
                            {"role": "user", "content": words(rng, 4, 40) + "?"}]
            body.update(messages=messages, logprobs=True)
            return "/v1/chat/completions", body
        body["prompt"] = rng.choice(OPENINGS) + " " + words(rng, 2, 60)
        return "/v1/completions", body

    def stream(self, route: str, body: dict, stop_after: int | None) -> tuple[list, str | None]:
        """The events' contents (chat: (token, logprob) pairs; completions: texts) and the finish
        reason; stops reading after `stop_after` events (a client hanging up mid-stream)."""
        import httpx

        events: list = []
        finish = None
        with httpx.stream("POST", self.base + route, json=body, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                for c in chunk.get("choices") or []:
                    if route.endswith("chat/completions"):
                        for lp in (c.get("logprobs") or {}).get("content") or []:
                            events.append((lp["token"], lp["logprob"]))
                    elif c.get("text"):
                        events.append(c["text"])
                    finish = c.get("finish_reason") or finish
                if stop_after is not None and len(events) >= stop_after:
                    return events, None  # leaving the with-block closes the connection
        return events, finish

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            route, body = self.request()
            hang_up = self.rng.randint(1, body["max_tokens"]) if self.rng.random() < self.a.disconnect else None
            try:
                events, finish = self.stream(route, body, hang_up)
            except Exception as e:  # counted and reported, never fatal to the soak
                with self.lock:
                    key = f"{type(e).__name__}: {str(e)[:120]}"
                    self.stats["errors"][key] = self.stats["errors"].get(key, 0) + 1
                time.sleep(0.5)
                continue
            with self.lock:
                self.stats["requests"] += 1
                self.stats["disconnected" if hang_up is not None and finish is None else "completed"] += 1
                self.stats["tokens"] += len(events)
            if finish is None:
                continue
            if body.get("temperature") == 0:
                self.greedy.append((route, body, events))
            if route.endswith("chat/completions"):
                text = "".join(t for t, _ in events)
                self.history = body["messages"] + [{"role": "assistant", "content": text}]


def process_stats(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    return {"rss_mb": p.memory_info().rss / 2**20, "threads": p.num_threads(), "fds": p.num_fds()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("MODEL", "builtin"), help="what slm serve loads ($MODEL)")
    ap.add_argument("--quant", default=None, help="slm serve --quant (e.g. none: the float path)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--slot-context", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--greedy", type=float, default=0.7, help="fraction of requests at temperature 0")
    ap.add_argument("--chat", type=float, default=0.6, help="fraction of chat (vs completion) requests")
    ap.add_argument("--disconnect", type=float, default=0.2, help="probability a client hangs up mid-stream")
    ap.add_argument("--max-replays", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak", help="results/<out>.json")
    a = ap.parse_args()

    cmd = [sys.executable, "-m", "slmkit.cli", "serve", f"m={a.model}", "--slots", str(a.slots),
           "--slot-context", str(a.slot_context), "--max-queue", str(4 * a.clients)]
    if a.quant:
        cmd += ["--quant", a.quant]
    log = Path(tempfile.mkstemp(prefix="slmkit-soak-", suffix=".log")[1])
    base, proc = launch(cmd, "slm serve", log=log)
    try:
        warm = Client(base, -1, a, {"errors": {}}, threading.Lock())
        warm.stream("/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 4, "stream": True}, None)
        before = process_stats(proc.pid)
        stats = {"requests": 0, "completed": 0, "disconnected": 0, "tokens": 0, "errors": {}}
        lock = threading.Lock()
        clients = [Client(base, a.seed * 1000 + i, a, stats, lock) for i in range(a.clients)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=c.run, args=(t0 + a.seconds,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        soak_s = time.monotonic() - t0
        time.sleep(2)  # let the server notice the last hang-ups
        after = process_stats(proc.pid)
        greedy = [g for c in clients for g in c.greedy][: a.max_replays]
        mismatched = logprob_only = replay_errors = 0
        examples = []
        t1 = time.monotonic()
        for route, body, events in greedy:  # each alone: nothing else is running now
            try:
                solo, _ = warm.stream(route, body, None)
            except Exception as e:
                replay_errors += 1
                stats["errors"][f"replay {type(e).__name__}: {str(e)[:120]}"] = 1
                continue
            tokens = [[e[0] if isinstance(e, tuple) else e for e in run] for run in (solo, events)]
            if tokens[0] != tokens[1]:
                mismatched += 1
                if len(examples) < 5:
                    i = next((i for i, (x, y) in enumerate(zip(*tokens)) if x != y), min(map(len, tokens)))
                    examples.append({"route": route, "diverged_at": i, "batched": events[i:i + 3],
                                     "solo": solo[i:i + 3]})
            elif solo != events:
                logprob_only += 1
        replay_s = time.monotonic() - t1
        final = process_stats(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tracebacks = log.read_text(errors="replace").count("Traceback")
    log.unlink()
    chat = sum(1 for r, _, _ in greedy if r.endswith("chat/completions"))
    row = {"model": a.model + (f" --quant {a.quant}" if a.quant else ""), "clients": a.clients, "soak_s": soak_s,
           "requests": stats["requests"], "completed": stats["completed"], "disconnected": stats["disconnected"],
           "errors": sum(stats["errors"].values()), "tok_s": stats["tokens"] / soak_s, "greedy_replayed": len(greedy),
           "greedy_chat": chat, "token_mismatches": mismatched, "logprob_only_mismatches": logprob_only,
           "replay_errors": replay_errors, "replay_s": replay_s, "server_tracebacks": tracebacks,
           "rss_mb_before": before["rss_mb"], "rss_mb_after": after["rss_mb"], "rss_mb_final": final["rss_mb"],
           "threads_before": before["threads"], "threads_after": after["threads"],
           "fds_before": before["fds"], "fds_after": after["fds"]}
    print_table([{"metric": k, "value": f"{v:.1f}" if isinstance(v, float) else str(v)} for k, v in row.items()],
                [("metric", "metric", ""), ("value", "value", "")])
    for k, v in stats["errors"].items():
        print(f"error x{v}: {k}")
    for ex in examples:
        print("mismatch:", json.dumps(ex)[:300])
    save_results(a.out, args=vars(a), result=row, errors=stats["errors"], mismatch_examples=examples)
    if mismatched or row["errors"] or tracebacks:
        sys.exit(1)


if __name__ == "__main__":
    main()
