"""Phi-3.5-MoE decode at int4 (random weights, real layer shapes) vs a dense model with the same active
parameters, vs llama.cpp on the same GGUF, and with RAM capped below the model size (mmap path).

    .venv/bin/python benchmarks/moe.py [--layers N] [--decode 64] [--cap-gb G]
    .venv/bin/python benchmarks/moe.py --tiny --layers 2      # a quick check of the plumbing (not a timing)

Rows (one fresh process each; --reps rounds over all rows, the median decode reported with min/max):
  moe int4        slmkit, the random Phi-3.5-MoE folder after `slm quantize --quant int4` (experts per expert)
  dense int4      slmkit, a Phi-3 with the same hidden size / attention and intermediate 2 x 6400 (the
                  same active parameters per token as top-2 of 16 experts), `slm quantize`d the same way
  moe gguf ours   slmkit on the MoE's Q4_0 GGUF (llama.cpp's quantizer), SparseMixer routing
  moe gguf llama  llama.cpp on the same GGUF (its own routing: renormalised softmax top-2)
  moe capped      `moe int4` (its folder is mapped, not copied) under a memory limit below its size
                  (systemd-run -p MemoryMax, or a memory cgroup made here when running as root)
Columns: load s, peak RSS, decode tok/s (greedy, after a 64-token prompt), weight bytes read per
decoded token (attention + lm_head + the 2 chosen experts per layer), and the ratio to the dense row.
Targets (issue 16): moe >= 0.8 x dense tok/s; ahead of llama.cpp on the same file. Run on an idle
machine: the numbers depend on nothing else running.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import peak_rss_gb, print_table, run_child, save_results, slmkit_speed  # noqa: E402

MSCALE = 1.243163121016122
# Phi-3.5-MoE-instruct's shapes (shared/specs/phi-family.md §3); the rope factor lists do not matter
# for speed, so they are all 1.0 here
PHI35_MOE = dict(
    architectures=["PhimoeForCausalLM"], model_type="phimoe", hidden_size=4096, intermediate_size=6400,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=16,
    num_experts_per_tok=2, vocab_size=32064, max_position_embeddings=131072, rope_theta=10000.0,
    rms_norm_eps=1e-5, router_jitter_noise=0.01, attention_bias=True, lm_head_bias=True, hidden_act="silu",
    rope_scaling={"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64,
                  "short_mscale": MSCALE, "long_mscale": MSCALE, "original_max_position_embeddings": 4096},
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False, torch_dtype="bfloat16",
)
TINY = dict(hidden_size=256, intermediate_size=384, num_attention_heads=8, num_key_value_heads=2,
            rope_scaling={**PHI35_MOE["rope_scaling"], "short_factor": [1.0] * 16, "long_factor": [1.0] * 16})


def moe_config(layers: int, tiny: bool) -> dict:
    return {**PHI35_MOE, **(TINY if tiny else {}), "num_hidden_layers": layers}


def dense_config(moe: dict) -> dict:
    """A Phi-3 with the MoE's attention and an MLP as wide as its two active experts together."""
    return dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=moe["hidden_size"],
                intermediate_size=moe["num_experts_per_tok"] * moe["intermediate_size"],
                num_hidden_layers=moe["num_hidden_layers"], num_attention_heads=moe["num_attention_heads"],
                num_key_value_heads=moe["num_key_value_heads"], vocab_size=moe["vocab_size"],
                max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
                bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
                torch_dtype="bfloat16")


def shapes_of(cfg: dict) -> dict[str, tuple[int, ...]]:
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                       "lm_head.weight": (V, H)}
    moe = cfg["model_type"] == "phimoe"
    if moe:
        out |= {"model.norm.bias": (H,), "lm_head.bias": (V,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        if not moe:
            out |= {p + "self_attn.qkv_proj.weight": (q + 2 * kv, H), p + "self_attn.o_proj.weight": (H, q),
                    p + "mlp.gate_up_proj.weight": (2 * I, H), p + "mlp.down_proj.weight": (H, I)}
            continue
        out |= {p + "input_layernorm.bias": (H,), p + "post_attention_layernorm.bias": (H,),
                p + "block_sparse_moe.gate.weight": (cfg["num_local_experts"], H)}
        for n, size in (("q", q), ("k", kv), ("v", kv)):
            out |= {p + f"self_attn.{n}_proj.weight": (size, H), p + f"self_attn.{n}_proj.bias": (size,)}
        out |= {p + "self_attn.o_proj.weight": (H, q), p + "self_attn.o_proj.bias": (H,)}
        for e in range(cfg["num_local_experts"]):
            x = p + f"block_sparse_moe.experts.{e}."
            out |= {x + "w1.weight": (I, H), x + "w3.weight": (I, H), x + "w2.weight": (H, I)}
    return out


def make_folder(folder: Path, cfg: dict) -> Path:
    """Random bf16 weights, one safetensors file per layer (never the whole model in memory)."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_tokenizer import build_phi_tokenizer

    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes_of(cfg).items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = shape
    wmap = {}
    for key, part in groups.items():
        fname = f"model-{key}.safetensors"
        tensors = {n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02)
                   .to(torch.bfloat16) for n, s in part.items()}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        wmap |= {n: fname for n in part}
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    build_phi_tokenizer(folder, "phi3-mini-june")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def bytes_per_token(cfg: dict, per_weight: float) -> int:
    """Weight bytes one decode step reads: attention, lm_head and the active MLP weights."""
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = H // cfg["num_attention_heads"]
    attn = H * (2 * cfg["num_attention_heads"] * hd + 2 * cfg["num_key_value_heads"] * hd)
    mlp = 3 * H * I * (cfg.get("num_experts_per_tok", 1) if cfg["model_type"] == "phimoe" else 1)
    return int(L * (attn + mlp) * per_weight + V * H * 1.0625)  # lm_head stays int8 at int4


def child(a: argparse.Namespace) -> dict:
    if a.engine == "llama":
        import time

        import llama_cpp

        ids = torch.randint(100, 30000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        t0 = time.perf_counter()
        ref = llama_cpp.Llama(model_path=a.path, n_ctx=512, n_batch=64, n_threads=torch.get_num_threads(),
                              verbose=False)
        load_s = time.perf_counter() - t0
        ref.eval(ids)
        t = time.perf_counter()
        for _ in range(a.decode - 1):
            ref.eval([int(ref.sample(temp=0.0))])
        return {"load_s": load_s, "decode_tok_s": (a.decode - 1) / (time.perf_counter() - t),
                "peak_rss_gb": peak_rss_gb()}
    kw = {"quant": a.quant} if a.quant else {}
    return slmkit_speed(a.path, prompt=64, decode=a.decode, **kw)


def cgroup_dir(cap_bytes: int) -> tuple[Path, str] | None:
    """A fresh memory cgroup limited to cap_bytes (v2 memory.max, else v1 memory.limit_in_bytes), or None."""
    import os

    for root, limit, swap in ((Path("/sys/fs/cgroup/unified"), "memory.max", "memory.swap.max"),
                              (Path("/sys/fs/cgroup"), "memory.max", "memory.swap.max"),
                              (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "")):
        if not (root / "cgroup.procs").is_file() or not os.access(root, os.W_OK):
            continue
        d = root / f"slmkit-bench-{os.getpid()}"
        try:
            d.mkdir(exist_ok=True)
            (d / limit).write_text(str(cap_bytes))
        except OSError:
            try:
                d.rmdir()
            except OSError:
                pass
            continue
        if swap and (d / swap).is_file():
            (d / swap).write_text("0")
        return d, limit
    return None


def drop_cached(path: Path) -> None:
    """Evict the model's files from the page cache, so the capped child pages them in under its own
    limit (pages already cached are charged to whoever read them first, and would escape the cap)."""
    import os

    for f in ([path] if path.is_file() else sorted(path.iterdir())):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def capped(script: Path, args: list[str], cap_gb: float) -> dict:
    """One child under a memory limit: systemd-run -p MemoryMax where systemd runs, else a memory cgroup
    made here (v2 or v1; needs root); an error row where neither is possible."""
    cap = int(cap_gb * 2**30)
    cmd = [sys.executable, str(script), "--child", *args]
    drop_cached(Path(args[args.index("--path") + 1]))
    if shutil.which("systemd-run") and subprocess.run(["systemd-run", "--user", "--scope", "-q", "true"],
                                                      capture_output=True).returncode == 0:
        proc = subprocess.run(["systemd-run", "--user", "--scope", "-q", "-p", f"MemoryMax={cap}", "-p",
                               "MemorySwapMax=0", *cmd], capture_output=True, text=True)
    elif (cg := cgroup_dir(cap)) is not None:
        d, _ = cg
        procs = str(d / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write("0")  # this (forked) process, before it execs the child

        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter)
            fail = (d / "memory.failcnt").read_text().strip() if (d / "memory.failcnt").is_file() else "?"
        finally:
            d.rmdir()
        if proc.returncode == 0:
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cgroup_limit_hits": fail}
    else:
        return {"error": "no memory cap here: systemd-run has no session and no writable memory cgroup"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help="layers (default: as many as fit at int4, up to 32)")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="rounds over every row (the median decode is reported)")
    ap.add_argument("--tiny", action="store_true", help="small hidden sizes: a check that everything runs")
    ap.add_argument("--dir", default="/tmp/slmkit-bench/moe")
    ap.add_argument("--cap-gb", type=float, default=None, help="memory limit of the capped row "
                    "(default: half the int4 model's size)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    from slmkit.loading.memory import available_bytes

    script, gguf_error = Path(__file__).resolve(), ""
    per_layer_int4 = bytes_per_token(moe_config(1, a.tiny), 0.625) * 16 / 2  # all 16 experts of a layer, roughly
    layers = a.layers or max(1, min(32, int(0.6 * (available_bytes() or 8 << 30) // per_layer_int4)))
    moe, work = moe_config(layers, a.tiny), Path(a.dir) / ("tiny" if a.tiny else "full") / f"L{layers}"
    dense = dense_config(moe)
    moe_dir, dense_dir = make_folder(work / "moe", moe), make_folder(work / "dense", dense)
    from slmkit.api import quantize as slm_quantize

    q_dirs = {}
    for name, src in (("moe", moe_dir), ("dense", dense_dir)):  # `slm quantize`'s folders: mapped, not copied
        q_dirs[name] = work / f"{name}-int4"
        if not (q_dirs[name] / "config.json").is_file():
            slm_quantize(src, q_dirs[name], quant="int4")
    size_gb = sum(p.stat().st_size for p in q_dirs["moe"].glob("*.safetensors")) / 2**30
    cap = a.cap_gb or size_gb / 2
    dec = ["--decode", str(a.decode)]
    specs: list[tuple[str, list[str], int, bool]] = [
        ("moe int4", ["--engine", "slmkit", "--path", str(q_dirs["moe"]), *dec], bytes_per_token(moe, 0.625), False),
        ("dense int4", ["--engine", "slmkit", "--path", str(q_dirs["dense"]), *dec], bytes_per_token(dense, 0.625),
         False)]
    try:
        from gguf_load import quantize

        from tests.helpers.gguf_models import hf_to_gguf

        f16 = work / "moe-F16.gguf"
        if not (work / "moe-Q4_0.gguf").is_file() and not f16.is_file():
            hf_to_gguf(moe_dir, f16, "F16")
        q4 = work / "moe-Q4_0.gguf" if (work / "moe-Q4_0.gguf").is_file() else quantize(f16, "Q4_0")
        for engine, name in (("slmkit", "moe gguf ours"), ("llama", "moe gguf llama")):
            specs.append((name, ["--engine", engine, "--path", str(q4), *dec], bytes_per_token(moe, 0.5625), False))
    except Exception as e:  # llama.cpp missing, or its quantizer refused the file: say so in the table
        specs.append(("moe gguf", [], 0, False))
        gguf_error = f"{type(e).__name__}: {e}"
    specs.append((f"moe capped {cap:.1f} GiB", ["--engine", "slmkit", "--path", str(q_dirs["moe"]), *dec],
                  bytes_per_token(moe, 0.625), True))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in specs}
    for _ in range(a.reps):  # rounds, each row once per round: drift on a shared machine hits every row alike
        for name, args, _, is_capped in specs:
            if args:
                runs[name].append(capped(script, args, cap) if is_capped else run_child(script, args))
    rows = []
    for name, _, nbytes, _ in specs:
        ok = [r for r in runs[name] if "decode_tok_s" in r]
        if not ok:
            rows.append({"row": name, "error": (runs[name] or [{"error": gguf_error}])[0].get("error")})
            continue
        speeds = sorted(r["decode_tok_s"] for r in ok)
        rows.append({"row": name, "load_s": ok[0]["load_s"], "load_s_warm": min(r["load_s"] for r in ok),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in ok), "decode_tok_s": speeds[len(speeds) // 2],
                     "decode_min": speeds[0], "decode_max": speeds[-1], "runs": len(ok), "bytes_per_token": nbytes,
                     **{k: v for k, v in ok[0].items() if k == "cgroup_limit_hits"}})
    base = next((r.get("decode_tok_s") for r in rows if r["row"] == "dense int4"), None)
    for r in rows:
        if base and r.get("decode_tok_s"):
            r["vs_dense"] = r["decode_tok_s"] / base
    print(f"Phi-3.5-MoE shapes{' (tiny)' if a.tiny else ''}, {layers} layers, int4 folder {size_gb:.2f} GiB")
    print_table(rows, [("row", "run", ""), ("load_s", "load s", ".1f"), ("load_s_warm", "warm load s", ".1f"),
                       ("peak_rss_gb", "peak RSS GB", ".2f"), ("decode_tok_s", "decode tok/s", ".2f"),
                       ("decode_min", "min", ".1f"), ("decode_max", "max", ".1f"),
                       ("bytes_per_token", "bytes/token", ",d"), ("vs_dense", "x dense", ".2f"),
                       ("error", "error", "")])
    if not a.tiny:
        save_results("moe", layers=layers, rows=rows)


if __name__ == "__main__":
    main()
