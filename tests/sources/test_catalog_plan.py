"""The catalog (names, tags, suggestions) and the memory plan, checked against hand computations
for a tiny local folder, a tiny GGUF and catalog entries; the cgroup-aware free memory."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slmkit.errors import MemoryPlanError, UnknownModelError
from slmkit.loading.memory import available_bytes
from slmkit.sources import catalog, memplan
from tests.helpers.gguf_files import write_gguf

FAMILY = ["phi3:mini", "phi3:mini-128k", "phi3.5", "phi3:small", "phi3:small-128k",
          "phi3:medium", "phi3:medium-128k", "phi3-vision",
          "phi3.5-vision", "phi3.5-moe", "phi4", "phi4-reasoning", "phi4-mini", "phi4-mini-reasoning",
          "phi4-multimodal", "builtin"]


def test_the_catalog_names_the_whole_family_with_its_facts():
    cat = catalog.entries()
    assert list(cat) == FAMILY
    for e in cat.values():
        assert e.params > 1e8 and e.context >= 4096 and e.licence and e.default in e.variants
        assert all(v.repo or v.package for v in e.variants.values())
    assert cat["phi3.5-vision"].modalities == ("text", "image") and cat["phi3.5-moe"].moe["experts"] == 16
    assert cat["phi3.5"].cloud["nim"] == "microsoft/phi-3.5-mini-instruct" and cat["phi3.5"].ollama == "phi3.5"
    assert cat["phi3:small-128k"].context == 131072 and cat["phi3:small-128k"].arch["model_type"] == "phi3small"
    assert cat["phi4"].context == 16384 and cat["phi4-mini"].arch["kv_heads"] == 8


def test_tags_pick_a_variant_and_bad_names_get_suggestions():
    e, v = catalog.lookup("phi3.5:q4_k_m")
    assert (e.name, v.format, v.file) == ("phi3.5", "gguf", "Phi-3.5-mini-instruct-Q4_K_M.gguf")
    assert catalog.lookup("phi3:mini")[1].tag == "bf16" and catalog.lookup("phi3:mini:q4")[1].format == "gguf"
    with pytest.raises(UnknownModelError) as e1:
        catalog.lookup("phi-3.5")
    assert "phi3.5" in e1.value.suggestions and "did you mean" in str(e1.value)
    with pytest.raises(UnknownModelError) as e2:
        catalog.lookup("phi3.5:q5_k_s")
    assert e2.value.suggestions == ["bf16", "q4_k_m", "q8_0", "onnx-int4"] and "q4_k_m" in str(e2.value)


def test_plan_for_a_catalog_entry_matches_a_hand_computation():
    p = memplan.make_plan(*memplan.shape_from_catalog("phi3.5"), quant="int4", ctx=8192, parallel=4,
                          available=16 * 2**30, gpu_available=None, probe=False)
    per_token = 2 * 32 * 32 * 96 * 2  # K and V, 32 layers x 32 kv heads x 96, bf16
    assert p.kv_bytes_per_token == per_token == 393216
    assert p.kv_bytes == per_token * 8192 * 4
    assert p.weights_bytes == int(3821079552 * 4.5 / 8)
    assert p.total_bytes == p.weights_bytes + p.kv_bytes and p.fits
    assert p.headroom_bytes == 16 * 2**30 - p.total_bytes
    d = p.as_dict()
    assert {"weights_bytes", "kv_bytes", "total_bytes", "available_bytes", "fits"} <= set(d)


def test_plan_says_what_to_change_when_it_does_not_fit():
    shape, prec = memplan.shape_from_catalog("phi3.5")
    # bf16: 7.12 GiB weights + 12 GiB KV; 15.5 GiB usable. int8 (3.78 + 12) is still over, int4 (2.00 + 12) fits;
    # 8.38 GiB left for KV after the weights: 2 slots of 8192 tokens, or 4 slots of 5722
    p = memplan.make_plan(shape, prec, ctx=8192, parallel=4, available=16 * 2**30, probe=False)
    assert not p.fits
    assert p.advice == ["use --quant int4 (weights 2.00 GiB)", "use --ctx 5722 or less", "use --parallel 2"]
    with pytest.raises(MemoryPlanError, match="does not fit"):
        memplan.check(p)
    moe = memplan.make_plan(*memplan.shape_from_catalog("phi3.5-moe"), quant="int4", available=8 * 2**30, probe=False)
    assert moe.expert_bytes == int(32 * 16 * 3 * 4096 * 6400 * 4.5 / 8) and "cannot hold it" in moe.message()


def test_plan_counts_the_vision_tower_and_image_tokens():
    shape, prec = memplan.shape_from_catalog("phi3.5-vision")
    p = memplan.make_plan(shape, prec, images=2, ctx=4096, available=64 * 2**30, probe=False)
    assert p.image_tokens == 2 * 757 and p.image_bytes == 2 * 757 * 3072 * 4
    assert p.vision_bytes == 303507456 * 2 and p.total_bytes == p.weights_bytes + p.kv_bytes + p.image_bytes
    short = memplan.make_plan(shape, prec, images=8, ctx=4096, available=64 * 2**30, probe=False)
    assert not short.fits and "--ctx" in short.advice[0]


def _tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    cfg = {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"a": torch.zeros(100, 64), "b": torch.zeros(10)}, str(folder / "model.safetensors"))
    return folder


def test_plan_for_a_tiny_folder_from_config_and_file_sizes(tmp_path):
    folder = _tiny_folder(tmp_path)
    p = memplan.make_plan(*memplan.shape_from_folder(folder), available=2**30, probe=False)
    assert p.params == 6410 and p.ctx == 512 and p.precision == "float32"
    assert p.weights_bytes == (folder / "model.safetensors").stat().st_size  # the files as they are
    assert p.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 and p.kv_bytes == 256 * 512
    q = memplan.make_plan(*memplan.shape_from_folder(folder), quant="int8", ctx=100, parallel=3, available=2**30,
                          probe=False)
    assert q.weights_bytes == int(6410 * 8.5 / 8) and q.kv_bytes == 256 * 100 * 3


def test_plan_for_a_tiny_gguf_from_its_header(tmp_path):
    meta = {"llama.block_count": 3, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 1,
            "llama.embedding_length": 32, "llama.context_length": 256}
    path = write_gguf(tmp_path / "t.gguf", "llama", meta, {"w": (np.zeros((8, 32), np.float32), "F32")})
    p = memplan.plan(path, ctx=None)
    assert p.params == 256 and p.ctx == 256 and p.weights_bytes == path.stat().st_size
    assert p.kv_bytes_per_token == 2 * 3 * 1 * 8 * 2


def test_free_memory_reads_cgroup_v2_and_v1_limits(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal: 100 kB\nMemAvailable:   8388608 kB\n")  # 8 GiB
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(str(3 * 2**30))
    (v2 / "memory.current").write_text(str(2**30))
    assert available_bytes(str(v2), str(info)) == 2 * 2**30
    (v2 / "memory.max").write_text("max")
    assert available_bytes(str(v2), str(info)) == 8 * 2**30
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(5 * 2**30))
    (v1 / "memory.usage_in_bytes").write_text(str(4 * 2**30))
    assert available_bytes(str(v1.parent), str(info)) == 2**30
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "unlimited"
    assert available_bytes(str(v1.parent), str(info)) == 8 * 2**30


def test_the_builtin_entry_matches_the_shipped_file():
    from slmkit.sources.builtin import builtin_model_path

    try:
        path = builtin_model_path()
    except Exception as e:  # noqa: BLE001  (the package is an optional install)
        pytest.skip(f"built-in model not available: {e}")
    real, _ = memplan.shape_from_gguf(path)
    cat, _ = memplan.shape_from_catalog("builtin")
    assert (real.params, real.layers, real.kv_heads, real.head_dim, real.hidden, real.context) == (
        cat.params, cat.layers, cat.kv_heads, cat.head_dim, cat.hidden, cat.context)
    assert abs(cat.params * cat.stored_bits / 8 - real.stored_bytes) < 0.01 * real.stored_bytes
