"""Benchmark plumbing: random-weight checkpoints of real size, subprocess runs, tables, JSON."""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# Phi-3-mini-4k-instruct shapes (3.82B parameters): the values of its config.json on the Hugging Face Hub
# (microsoft/Phi-3-mini-4k-instruct).
PHI3_MINI = dict(
    architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
    max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
    rms_norm_eps=1e-5, sliding_window=2047, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, torch_dtype="bfloat16",
)


def phi3_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = H // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                          "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.qkv_proj.weight": (qkv, H),
                   p + "self_attn.o_proj.weight": (H, hd * cfg["num_attention_heads"]),
                   p + "mlp.gate_up_proj.weight": (2 * I, H), p + "mlp.down_proj.weight": (H, I)}
    return shapes


def make_random_phi3(folder: Path, layers: int | None = None) -> Path:
    """A Phi-3-mini-size HF folder with random bf16 weights, sharded like the hub's (2 files + index)."""
    from safetensors.torch import save_file

    cfg = dict(PHI3_MINI)
    if layers:
        cfg["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    shapes = phi3_tensors(cfg)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    g = torch.Generator().manual_seed(0)
    wmap = {}
    for n, part in enumerate(halves, 1):
        fname = f"model-{n:05d}-of-00002.safetensors"
        tensors = {}
        for name in part:
            shape = shapes[name]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            wmap[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    # a small real Llama-style tokenizer (the benchmark feeds token ids; the loader wants the files)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_tokenizer import build_phi_tokenizer

    build_phi_tokenizer(folder, "phi3-mini-june")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork/exec, so a child of a big parent would report the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_parser(types: str) -> Any:
    """The arguments the engine-vs-engine benchmarks share: GGUF types to build, the random model's
    folder, prompt and decode lengths, and the hidden --child/--engine/--path of one measured run."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--types", default=types)
    ap.add_argument("--folder", default="/tmp/slmkit-bench/phi3-mini-random")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    return ap


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (honest load time and peak RSS); it prints one JSON line."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [
        [("-" if r.get(k) is None else format(r[k], f) if f else str(r[k])) for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def slmkit_speed(model: str, *, prompt: int, decode: int, reps: int = 1, **load_kw: Any) -> dict[str, Any]:
    """Load time, prefill tok/s (one pass over `prompt` random ids) and greedy decode tok/s (`decode`
    tokens after a 64-token prompt, clock started after the first step), medians of `reps`."""
    import time

    import slmkit
    from slmkit import Generator, GeneratorParams
    from slmkit.loading import gguf_cache

    t0 = time.perf_counter()
    llm = slmkit.load(model, **load_kw)
    load_s = time.perf_counter() - t0
    gguf_cache.wait()  # a first GGUF load writes its cache on a thread of its own: not during the timed runs
    eng = llm.engine
    ids = torch.randint(100, 30000, (1, prompt), generator=torch.Generator().manual_seed(0))
    eng.forward(ids[:, :8], eng.new_cache(1, 16))  # warm-up (page in weights, oneDNN kernels)
    prefill, dec = [], []
    for _ in range(reps):
        cache = eng.new_cache(1, prompt + 1)
        t = time.perf_counter()
        eng.forward(ids, cache)
        prefill.append(prompt / (time.perf_counter() - t))
    for _ in range(reps):
        gen = Generator(llm, GeneratorParams(max_new_tokens=decode, temperature=0, ignore_eos=True))
        gen.append_tokens(ids[0, :64].tolist())
        gen.generate_next_token()
        gen.get_logits()
        t = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
            if not gen.is_done():
                gen.get_logits()
        dec.append((decode - 1) / (time.perf_counter() - t))
    return {"load_s": load_s, "prefill_tok_s": median(prefill), "decode_tok_s": median(dec),
            "peak_rss_gb": peak_rss_gb(), "runs_as": str(eng.dtype).removeprefix("torch.")}


def save_results(name: str, **payload: Any) -> Path:
    """benchmarks/results/<name>.json with the benchmark's name and this machine's facts."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2))
    print(f"\nwrote {out}")
    return out
