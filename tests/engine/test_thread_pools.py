"""Loading a model and enabling batching leave no OpenMP worker pool on the caller's thread
(streams.on_own_thread): libgomp keeps a pool per thread that ran a parallel region, and with more
pool threads than CPUs every pool stops spinning between regions, which slows every decode step of
the engine's thread (a server's single stream). Counted from the OS: threads beyond Python's."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from slmkit.streams import on_own_thread

SCRIPT = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads(2)  # a pool has a worker thread even on a one-CPU machine
import slmkit

def extra():  # OS threads that are not Python threads: OpenMP (and other native) workers
    return len(os.listdir("/proc/self/task")) - threading.active_count()

base = extra()
ref = torch.ones(1 << 22)
torch.add(ref, 1)  # what load() used to leave behind: this thread's own pool
with_pool = extra()
print(json.dumps({"base": base, "with_pool": with_pool}), flush=True)
"""

LOAD = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads(2)
import slmkit

def extra():
    return len(os.listdir("/proc/self/task")) - threading.active_count()

def settled(base):
    for _ in range(100):
        if extra() <= base:
            break
        time.sleep(0.02)
    return extra()

base = extra()
llm = slmkit.load(sys.argv[1])
after_load = settled(base)
llm.enable_batching(2, 64)
after_batching = settled(base)
llm.embed(["an embedding beside the batch engine"])
after_embed = settled(base)
print(json.dumps({"base": base, "after_load": after_load, "after_batching": after_batching,
                  "after_embed": after_embed}), flush=True)
"""

linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
def test_the_count_sees_a_pool():
    """The measure itself: a parallel region on the main thread leaves worker threads the count sees."""
    r = run(SCRIPT)
    assert r["with_pool"] > r["base"]


@linux_only
def test_load_batching_and_embeddings_leave_no_pool_on_the_callers_thread(phi3_folders):
    r = run(LOAD, str(phi3_folders("gqa")))
    assert r["after_load"] == r["base"]
    assert r["after_batching"] == r["base"]
    assert r["after_embed"] == r["base"]  # beside batching, one-off work runs on a thread of its own


def test_on_own_thread_returns_raises_and_runs_elsewhere():
    seen = []
    assert on_own_thread(lambda a, b=0: seen.append(threading.current_thread()) or a + b, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="gone"):
        on_own_thread(lambda: {}["gone"])
