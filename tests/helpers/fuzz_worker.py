"""The file fuzz's worker process: load N mutated model files, report every input that did not
either load or raise a SlmkitError, took too long, or grew the process's peak memory.

    python -m tests.helpers.fuzz_worker {gguf|folder} OUT_JSON SEED N SEED_PATH...

It runs apart from pytest so that its address-space limit (a backstop: a hostile size must not take
the machine's memory) and a hang cannot touch the test process. Each input i is made from
random.Random(f"{SEED}:{i}"), so a reported index reproduces its input. Progress goes to
OUT_JSON + ".progress" (the index being tried), so a hard hang is still attributable.
"""
from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import slmkit
from slmkit.errors import SlmkitError
from tests.helpers.fuzz_inputs import mutate_folder_file, mutate_gguf, weird_value
from tests.helpers.gguf_files import gguf_layout

SLOW_S = 30.0  # an input still loading after this long is reported as a hang (tiny files load in ms)
PEAK_GROWTH_MB = 100  # an input that raises the process's peak RSS by more than this is reported
ADDRESS_SPACE_HEADROOM = 4 << 30  # the backstop: allocations past this fail instead of swapping


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise Hang(f"still loading after {SLOW_S:.0f} s")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_address_space() -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_SPACE_HEADROOM, resource.RLIM_INFINITY))


def _gguf_inputs(seeds: list[Path], scratch: Path, seed: str, n: int):
    layouts = [(s.read_bytes(), gguf_layout(s)) for s in seeds]
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        data, layout = layouts[i % len(layouts)]
        mutated, what = mutate_gguf(data, layout, rng)
        path = scratch / "model.gguf"
        path.write_bytes(mutated)
        yield i, path, f"{seeds[i % len(seeds)].name}: {what}"


def _index(rng: random.Random) -> str:
    """A model.safetensors.index.json for a folder's one shard: malformed, or naming too little."""
    names = ["model.norm.weight", "model.embed_tokens.weight"]
    wmap: object = {n: "model.safetensors" for n in names}
    kind = rng.choice(["weird", "missing-shard", "traversal", "valid-partial"])
    if kind == "weird":
        wmap = weird_value(rng)
    elif kind == "missing-shard":
        wmap = {names[0]: "model-00009-of-00009.safetensors"}
    elif kind == "traversal":
        wmap = {names[0]: rng.choice(["../config.json", "/etc/passwd", "sub/model.safetensors", ""])}
    return json.dumps({"metadata": {}, "weight_map": wmap})


def _folder_inputs(seeds: list[Path], scratch: Path, seed: str, n: int):
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        src = seeds[i % len(seeds)]
        dst = scratch / f"m{i}"
        dst.mkdir()
        files = sorted(p.name for p in src.iterdir())
        target = rng.choice(files + ["model.safetensors.index.json"])
        for name in files:
            if name != target:
                (dst / name).symlink_to(src / name)
        if target == "model.safetensors.index.json":
            (dst / target).write_text(_index(rng))
            what = "index.json"
        else:
            data, what = mutate_folder_file(target, (src / target).read_bytes(), rng)
            (dst / target).write_bytes(data)
        yield i, dst, f"{src.name}/{target}: {what}"
        shutil.rmtree(dst, ignore_errors=True)


def run(kind: str, seeds: list[Path], seed: str, n: int, progress: Path) -> dict:
    for s in seeds:  # warm up: every seed loads, and the threads and caches a load needs exist
        slmkit.load(s, dtype="float32")
    _limit_address_space()
    signal.signal(signal.SIGALRM, _alarm)
    outcomes: Counter[str] = Counter()
    failures: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slmkit-fuzz-") as tmp:
        inputs = (_gguf_inputs if kind == "gguf" else _folder_inputs)(seeds, Path(tmp), seed, n)
        for i, path, what in inputs:
            progress.write_text(f"{i}\t{what}\n")
            before = _peak_mb()
            signal.setitimer(signal.ITIMER_REAL, SLOW_S)
            error = None
            try:
                slmkit.load(path, dtype="float32")
                outcomes["loaded"] += 1
            except SlmkitError as e:
                outcomes[type(e).__name__] += 1
            except BaseException as e:  # noqa: BLE001 -- anything else is the finding (PanicException too)
                if isinstance(e, KeyboardInterrupt):
                    raise
                error = f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc(limit=-6)[-1500:]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            grown = _peak_mb() - before  # the peak only rises: by about what this input allocated
            if grown > PEAK_GROWTH_MB:
                error = (error or "") + f"peak RSS grew by {grown:.0f} MB"
            if error:
                failures.append({"index": i, "input": what, "error": error})
    return {"kind": kind, "seed": seed, "n": n, "outcomes": dict(outcomes), "failures": failures,
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_peak_mb(), 1)}


def main(argv: list[str]) -> int:
    kind, out, seed, n, *seeds = argv
    out_path = Path(out)
    result = run(kind, [Path(s) for s in seeds], seed, int(n), Path(out + ".progress"))
    out_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
