"""The Ray path's cost: `slm serve` direct vs `slm serve --ray` (Ray's proxy, then the front deployment,
then one model replica holding the same CPUs: two hops, each token streamed through both) on the same
model, 1 and 8 concurrent streams: time to first token and aggregate tokens/s.

    .venv/bin/python benchmarks/ray_serve.py [--model /tmp/slmkit-bench/phi3-mini-random-int4-g32]
    .venv/bin/python benchmarks/ray_serve.py --quick      # a tiny random model, 1 and 2 streams: checks it runs

Each server runs in its own process as users run it (continuous batching, 8 slots of 512 tokens),
streams and timing as benchmarks/serve.py (its `run`: ~40-token prompts, 64 greedy tokens, httpx).
On a 2-core machine two replicas cannot beat one, so this measures the hops, not scaling; the README's
scaling plan multiplies the per-replica figures. Prints a table, writes results/ray_serve.json.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import print_table, save_results  # noqa: E402
from serve import launch, measure  # noqa: E402


def start(model: str, slots: int, ray_cpus: float | None):
    cmd = [sys.executable, "-m", "slmkit.cli", "serve", f"m={model}", "--slots", str(slots),
           "--slot-context", "512", "--max-queue", "64"]
    if ray_cpus is not None:  # one replica, given the CPUs the direct server uses
        cmd += ["--ray", "--replicas", "1", "--replica-cpus", str(ray_cpus)]
    return launch(cmd, "slm serve --ray" if ray_cpus is not None else "slm serve")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/slmkit-bench/phi3-mini-random-int4-g32")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--replica-cpus", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="a tiny random model and 1, 2 streams: a check that it runs")
    a = ap.parse_args()
    model, streams = a.model, (1, 8)
    if a.quick:
        from tests.helpers.tiny_models import make_phi3_folder

        model, streams = str(make_phi3_folder(Path(tempfile.mkdtemp()) / "tiny", "gqa")), (1, 2)
    rows = []
    for how, cpus in (("direct", None), ("ray serve, 1 replica", a.replica_cpus)):
        base, proc = start(model, a.slots, cpus)
        try:
            rows += measure(base, streams, how)
        finally:
            proc.send_signal(signal.SIGINT)  # --ray shuts its Serve app and local Ray instance down
            proc.wait(timeout=60)
    direct = {r["streams"]: r for r in rows if r["server"] == "direct"}
    for r in rows:
        d = direct[r["streams"]]
        r["tok_s_vs_direct"] = r["aggregate_tok_s"] / d["aggregate_tok_s"]
        r["ttft_added_ms"] = (r["ttft_p50_s"] - d["ttft_p50_s"]) * 1e3
    print_table(rows, [("server", "server", ""), ("streams", "streams", ""), ("aggregate_tok_s", "tok/s", ".2f"),
                       ("tok_s_vs_direct", "x direct", ".2f"), ("ttft_p50_s", "TTFT p50 s", ".3f"),
                       ("ttft_added_ms", "TTFT added ms", ".1f")])
    save_results("ray_serve_quick" if a.quick else "ray_serve", model=model, slots=a.slots,
                 replica_cpus=a.replica_cpus, rows=rows)


if __name__ == "__main__":
    main()
