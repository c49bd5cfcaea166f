"""A program that enables continuous batching and exits right after its last answer exits cleanly:
the engine thread finishes its step and stops at interpreter exit (an atexit hook), instead of being
inside a native op while the interpreter finalizes, which aborted the process ("terminate called
without an active exception", exit 134)."""
from __future__ import annotations

import os
import subprocess
import sys

import slmkit


def test_exit_right_after_a_batched_answer_is_clean(tmp_path):
    """The built-in model (its 262k-entry vocabulary makes a step's tail long enough to be caught;
    a tiny model's thread was always idle by then)."""
    code = ("import slmkit\n"
            "llm = slmkit.load()\n"
            "llm.enable_batching(slots=2, context=256)\n"
            "r = llm.generate('Summarise: the cat sat on the mat.', max_new_tokens=12, temperature=0,\n"
            "                 ignore_eos=True)\n"
            "print(len(r.token_ids), flush=True)\n")
    env = {**os.environ, "SLMKIT_GGUF_CACHE": str(tmp_path)}  # runs 2, 3 load from the cache run 1 writes
    for _ in range(3):  # (a first load's cache writer, joined at exit, had left the engine thread idle)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0 and "terminate" not in out.stderr, (out.returncode, out.stderr[-2000:])
        assert out.stdout.split() == ["12"]


def test_a_closed_engine_leaves_no_exit_hook(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"))
    llm.enable_batching(slots=2, context=128)
    assert llm.generate("Hi", max_new_tokens=2, ignore_eos=True).token_ids
    llm.close()  # the hook is gone with the engine: exit does not close it twice
