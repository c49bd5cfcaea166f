"""Phi-3.5-MoE decode at int4 (random weights, real layer shapes) vs a dense model with the same active
parameters, vs llama.cpp on the same GGUF, and with RAM capped below the model size (mmap path).

    .venv/bin/python benchmarks/moe.py [--layers N] [--decode 64] [--cap-gb G]
    .venv/bin/python benchmarks/moe.py --tiny --layers 2      # a quick check of the plumbing (not a timing)

Rows (one fresh process each):
  moe int4        slmkit, the random Phi-3.5-MoE folder quantized at load (int4, experts per expert)
  dense int4      slmkit, a Phi-3 with the same hidden size / attention and intermediate 2 x 6400 (the
                  same active parameters per token as top-2 of 16 experts), int4
  moe gguf ours   slmkit on the MoE's Q4_0 GGUF (llama.cpp's quantizer), SparseMixer routing
  moe gguf llama  llama.cpp on the same GGUF (its own routing: renormalised softmax top-2)
  moe capped      `moe int4` from `slm quantize`'s folder (mapped, not copied) under a memory limit
                  below its size (systemd-run -p MemoryMax, when this machine allows it)
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


def capped(script: Path, args: list[str], cap_gb: float) -> dict:
    """One child under MemoryMax (a transient systemd scope); an error row where that is not possible."""
    if shutil.which("systemd-run") is None:
        return {"error": "systemd-run not found: no memory cap on this machine"}
    cmd = ["systemd-run", "--user", "--scope", "-q", "-p", f"MemoryMax={int(cap_gb * 2**30)}", "-p", "MemorySwapMax=0",
           sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="small hidden sizes: a check that everything runs")
    ap.add_argument("--dir", default="/tmp/slmkit-bench/moe")
    ap.add_argument("--cap-gb", type=float, default=None, help="memory limit of the capped row "
                    "(default: half the int4 model's size)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    from slmkit.loading.memory import available_bytes

    per_layer_int4 = bytes_per_token(moe_config(1, a.tiny), 0.625) * 16 / 2  # all 16 experts of a layer, roughly
    layers = a.layers or max(1, min(32, int(0.6 * (available_bytes() or 8 << 30) // per_layer_int4)))
    moe, work = moe_config(layers, a.tiny), Path(a.dir) / ("tiny" if a.tiny else "full") / f"L{layers}"
    dense = dense_config(moe)
    moe_dir, dense_dir = make_folder(work / "moe", moe), make_folder(work / "dense", dense)
    script, rows = Path(__file__).resolve(), []
    rows.append({"row": "moe int4", **run_child(script, ["--engine", "slmkit", "--path", str(moe_dir),
                                                          "--quant", "int4", "--decode", str(a.decode)]),
                 "bytes_per_token": bytes_per_token(moe, 0.625)})
    rows.append({"row": "dense int4", **run_child(script, ["--engine", "slmkit", "--path", str(dense_dir),
                                                            "--quant", "int4", "--decode", str(a.decode)]),
                 "bytes_per_token": bytes_per_token(dense, 0.625)})
    try:
        from gguf_load import quantize

        from tests.helpers.gguf_models import hf_to_gguf

        f16 = work / "moe-F16.gguf"
        if not f16.is_file():
            hf_to_gguf(moe_dir, f16, "F16")
        q4 = quantize(f16, "Q4_0")
        for engine, name in (("slmkit", "moe gguf ours"), ("llama", "moe gguf llama")):
            rows.append({"row": name, **run_child(script, ["--engine", engine, "--path", str(q4),
                                                           "--decode", str(a.decode)]),
                         "bytes_per_token": bytes_per_token(moe, 0.5625)})
    except Exception as e:  # llama.cpp missing, or its quantizer refused the file: say so in the table
        rows.append({"row": "moe gguf", "error": f"{type(e).__name__}: {e}"})
    from slmkit.api import quantize as slm_quantize

    q_dir = work / "moe-int4"
    if not (q_dir / "config.json").is_file():
        slm_quantize(moe_dir, q_dir, quant="int4")
    size_gb = sum(p.stat().st_size for p in q_dir.glob("*.safetensors")) / 2**30
    cap = a.cap_gb or size_gb / 2
    rows.append({"row": f"moe capped {cap:.1f} GiB", **capped(script, ["--engine", "slmkit", "--path", str(q_dir),
                                                                       "--decode", str(a.decode)], cap),
                 "bytes_per_token": bytes_per_token(moe, 0.625)})
    base = next((r.get("decode_tok_s") for r in rows if r["row"] == "dense int4"), None)
    for r in rows:
        if base and r.get("decode_tok_s"):
            r["vs_dense"] = r["decode_tok_s"] / base
    print(f"Phi-3.5-MoE shapes{' (tiny)' if a.tiny else ''}, {layers} layers, int4 folder {size_gb:.2f} GiB")
    print_table(rows, [("row", "run", ""), ("load_s", "load s", ".1f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
                       ("decode_tok_s", "decode tok/s", ".2f"), ("bytes_per_token", "bytes/token", ",d"),
                       ("vs_dense", "x dense", ".2f"), ("error", "error", "")])
    if not a.tiny:
        save_results("moe", layers=layers, rows=rows)


if __name__ == "__main__":
    main()
