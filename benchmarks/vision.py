"""Phi-3.5-vision-size (4.15B, random weights) image prompts: slmkit vs the transformers reference.

    .venv/bin/python benchmarks/vision.py               # full size
    .venv/bin/python benchmarks/vision.py --layers 2    # quick check: a 2-layer LM, a 2-layer tower

Two workloads: one 1344x896 image at num_crops 16, and 8 video-like 640x360 frames at num_crops 4.
Per workload: preprocessing ms (the processor, per image), tower ms (vision encoder + HD transform
+ projection, per image), image tokens, LM prefill tok/s over the whole prompt (features already
computed), time to first token of the first question (everything) and of a second question about
the same image in a chat session (KV reused: only the new tokens run), and peak RSS.
The peer is transformers: CLIPVisionModel + Phi3ForCausalLM on the same weights with the §4 glue
(its hub remote code is not loadable here), with our processor's pixel values (preprocessing is
ours in both). Each engine runs in its own process. Writes benchmarks/results/vision.json.
Do not run beside tests or other load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import make_random_phi3, peak_rss_gb, print_table, run_child, save_results  # noqa: E402

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
QUESTION = "<|user|>\n{tags}Describe what you see.<|end|>\n<|assistant|>\n"
FOLLOW_UP = "What colour is it?"


def make_random_phi3v(folder: Path, layers: int | None) -> Path:
    """Phi-3-mini-size LM (make_random_phi3) plus a ViT-L/14-336 tower and the projection, bf16."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_tokenizer import build_phi_tokenizer

    vision = dict(VISION, num_hidden_layers=layers or VISION["num_hidden_layers"])
    done = folder / "config.json"
    if done.is_file():
        cfg = json.loads(done.read_text())
        if cfg.get("model_type") == "phi3_v" and cfg.get("vision_config") == (vision if layers else None):
            return folder
    make_random_phi3(folder, layers)
    cfg = json.loads((folder / "config.json").read_text())
    C, H = vision["hidden_size"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(1)
    p = "model.vision_embed_tokens."
    v = p + "img_processor.vision_model."
    shapes = {v + "embeddings.class_embedding": (C,), v + "embeddings.patch_embedding.weight": (C, 3, 14, 14),
              v + "embeddings.position_embedding.weight": (577, C), v + "pre_layrnorm.weight": (C,),
              v + "pre_layrnorm.bias": (C,), p + "img_projection.0.weight": (H, 4 * C),
              p + "img_projection.0.bias": (H,), p + "img_projection.2.weight": (H, H),
              p + "img_projection.2.bias": (H,),
              p + "glb_GN": (1, 1, 4 * C), p + "sub_GN": (1, 1, 1, 4 * C)}
    for i in range(vision["num_hidden_layers"]):
        e = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{e}self_attn.{name}.weight": (C, C), f"{e}self_attn.{name}.bias": (C,)}
        shapes |= {e + "mlp.fc1.weight": (4 * C, C), e + "mlp.fc1.bias": (4 * C,), e + "mlp.fc2.weight": (C, 4 * C),
                   e + "mlp.fc2.bias": (C,)}
        for n in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{e}{n}.weight": (C,), f"{e}{n}.bias": (C,)}
    tensors = {k: (torch.ones(s) if k.endswith("norm1.weight") or k.endswith("norm2.weight")
                   or k.endswith("layrnorm.weight") else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items()}
    save_file(tensors, str(folder / "model-vision.safetensors"), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-vision.safetensors" for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    build_phi_tokenizer(folder, "phi3-vision")
    (folder / "preprocessor_config.json").write_text(json.dumps({"num_crops": 4}))
    cfg.update(model_type="phi3_v", architectures=["Phi3VForCausalLM"], max_position_embeddings=131072,
               img_processor={"image_dim_out": C, "model_name": "openai/clip-vit-large-patch14-336",
                              "name": "clip_vision_model", "num_img_tokens": 144},
               embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True})
    if layers:
        cfg["vision_config"] = vision
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def workload(name: str) -> tuple[list, int]:
    """(images, num_crops): synthetic pictures (gradients and shapes: content does not change speed)."""
    from PIL import Image, ImageDraw

    def picture(w: int, h: int, seed: int) -> Image.Image:
        im = Image.new("RGB", (w, h), (seed * 40 % 255, 120, 200))
        d = ImageDraw.Draw(im)
        for i in range(12):
            d.rectangle([i * w // 14, i * h // 20, i * w // 14 + w // 8, i * h // 20 + h // 6], fill=(i * 20, seed, 90))
        return im

    if name == "image-16":
        return [picture(1344, 896, 1)], 16
    return [picture(640, 360, i) for i in range(8)], 4


def child_slmkit(folder: str, name: str) -> dict:
    import slmkit

    images, crops = workload(name)
    llm = slmkit.load(folder)
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(images)))
    prompt = QUESTION.format(tags=tags)
    t = time.perf_counter()
    inputs = llm.processor(prompt, images=images, num_crops=crops)
    pre_ms = (time.perf_counter() - t) * 1000 / len(images)
    model = llm.engine.model
    model.encode_image(inputs.pixel_values[0], tuple(inputs.image_sizes[0].tolist()))  # warm-up
    t = time.perf_counter()
    for px, size in zip(inputs.pixel_values, inputs.image_sizes):
        model.encode_image(px, tuple(size.tolist()))
    tower_ms = (time.perf_counter() - t) * 1000 / len(images)
    llm.engine.images = type(llm.engine.images)()  # forget those features: the chat below starts cold
    parts = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
    session = llm.session(max_new_tokens=1, temperature=0)
    t = time.perf_counter()
    session.send(parts + [{"type": "text", "text": "Describe what you see."}], num_crops=crops)
    ttft_first = time.perf_counter() - t
    t = time.perf_counter()
    session.send(FOLLOW_UP, num_crops=crops)
    ttft_second = time.perf_counter() - t
    n = len(inputs.input_ids)
    t = time.perf_counter()  # the features are in the store now: a fresh request runs the LM prefill alone
    llm.generate(inputs, max_new_tokens=1, temperature=0)
    prefill_s = time.perf_counter() - t
    return {"preprocess_ms": pre_ms, "tower_ms": tower_ms, "image_tokens": sum(inputs.num_image_tokens) // len(images),
            "prompt_tokens": n, "prefill_tok_s": n / prefill_s, "ttft_first_s": ttft_first,
            "ttft_second_s": ttft_second, "peak_rss_gb": peak_rss_gb()}


def _data_url(im) -> str:
    import base64
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def child_transformers(folder: str, name: str) -> dict:
    """CLIPVisionModel + Phi3ForCausalLM (bf16) and the §4 glue, fed our processor's output."""
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    import slmkit

    cfg = json.loads((Path(folder) / "config.json").read_text())
    images, crops = workload(name)
    llm = slmkit.load(folder)  # for the processor only
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(images)))
    inputs = llm.processor(QUESTION.format(tags=tags), images=images, num_crops=crops)
    llm.close()
    del llm
    state = {}
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(Path(folder) / f), framework="pt") as sf:
            state |= {k: sf.get_tensor(k) for k in sf.keys()}
    v = "model.vision_embed_tokens.img_processor.vision_model."
    tower = CLIPVisionModel(CLIPVisionConfig(**cfg.get("vision_config", VISION))).to(torch.bfloat16).eval()
    tower.load_state_dict({k[len(v):]: t for k, t in state.items() if k.startswith(v)}, strict=False)
    text = {k: x for k, x in cfg.items() if k not in ("vision_config", "img_processor", "embd_layer", "model_type")}
    lm = Phi3ForCausalLM(Phi3Config(**text)).to(torch.bfloat16).eval()
    lm.load_state_dict({k: t for k, t in state.items() if not k.startswith("model.vision_embed_tokens")},
                       strict=True)
    p = "model.vision_embed_tokens."
    C, H = tower.config.hidden_size, cfg["hidden_size"]
    proj = torch.nn.Sequential(torch.nn.Linear(4 * C, H), torch.nn.GELU(), torch.nn.Linear(H, H)).to(torch.bfloat16)
    proj.load_state_dict({k[len(p + "img_projection."):]: t for k, t in state.items()
                          if k.startswith(p + "img_projection.")})
    glb, sub = state[p + "glb_GN"], state[p + "sub_GN"]
    del state

    def features(px: torch.Tensor, size: list[int]) -> torch.Tensor:
        h, w = size[0] // 336, size[1] // 336
        f = tower(px[: 1 + h * w].to(torch.bfloat16), output_hidden_states=True).hidden_states[-2][:, 1:]
        n, L, c = f.shape
        g = int(L ** 0.5) // 2
        f = f.reshape(n, g, 2, g, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, g, g, 4 * c)
        gl = torch.cat([f[:1], sub.repeat(1, g, 1, 1)], dim=2).reshape(1, -1, 4 * c)
        s = f[1:].reshape(1, h, w, g, g, 4 * c).permute(0, 1, 3, 2, 4, 5).reshape(1, h * g, w * g, 4 * c)
        s = torch.cat([s, sub.repeat(1, h * g, 1, 1)], dim=2).reshape(1, -1, 4 * c)
        return proj(torch.cat([s, glb, gl], dim=1))[0]

    with torch.inference_mode():
        features(inputs.pixel_values[0], inputs.image_sizes[0].tolist())  # warm-up
        t = time.perf_counter()
        feats = [features(px, s.tolist()) for px, s in zip(inputs.pixel_values, inputs.image_sizes)]
        tower_ms = (time.perf_counter() - t) * 1000 / len(images)
        ids = inputs.input_ids[None]
        emb = lm.model.embed_tokens(ids.clamp_min(0))
        for k, f in enumerate(feats, 1):
            emb[ids == -k] = f.to(emb.dtype)
        t = time.perf_counter()
        lm(inputs_embeds=emb, logits_to_keep=1)
        prefill_s = time.perf_counter() - t
    n = ids.shape[1]
    return {"tower_ms": tower_ms, "image_tokens": sum(inputs.num_image_tokens) // len(images), "prompt_tokens": n,
            "prefill_tok_s": n / prefill_s, "ttft_first_s": tower_ms * len(images) / 1000 + prefill_s,
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="image-16,frames-8")
    ap.add_argument("--engines", default="slmkit,transformers")
    ap.add_argument("--layers", type=int, default=None, help="a shallow model, for a quick check")
    ap.add_argument("--folder", default=None)
    a = ap.parse_args()
    folder = a.folder or f"/tmp/slmkit-bench/phi3v-random{'-' + str(a.layers) if a.layers else ''}"
    if a.child:
        fn = child_slmkit if a.engine == "slmkit" else child_transformers
        print(json.dumps(fn(folder, a.workload)))
        return
    make_random_phi3v(Path(folder), a.layers)
    rows = []
    for name in a.workload.split(","):
        for engine in a.engines.split(","):
            r = run_child(Path(__file__), ["--engine", engine, "--workload", name, "--folder", folder])
            rows.append({"workload": name, "engine": engine, **r})
            print(rows[-1], flush=True)
    print_table(rows, [("workload", "workload", ""), ("engine", "engine", ""), ("preprocess_ms", "prep ms/img", ".0f"),
                       ("tower_ms", "tower ms/img", ".0f"), ("image_tokens", "tok/img", ""),
                       ("prompt_tokens", "prompt", ""), ("prefill_tok_s", "prefill tok/s", ".1f"),
                       ("ttft_first_s", "TTFT 1st s", ".2f"), ("ttft_second_s", "TTFT 2nd s", ".2f"),
                       ("peak_rss_gb", "peak GB", ".2f"), ("error", "error", "")])
    save_results("vision" if not a.layers else f"vision-{a.layers}layers", layers=a.layers, rows=rows,
                 note="random weights; preprocessing is slmkit's processor for both engines")


if __name__ == "__main__":
    main()
