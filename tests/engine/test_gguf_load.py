"""GGUF models: tiny phi3 / gemma3 files written like llama.cpp's converter writes them, in several
ggml types, give the logits of transformers running the same (dequantized) weights; llama.cpp agrees
on the metadata; Ollama stores and the CLI reach them."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.gguf import open_gguf
from tests.helpers.gguf_models import hf_to_gguf
from tests.helpers.tiny_models import make_gemma3_folder

QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q5_1"]


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    return make_gemma3_folder(tmp_path_factory.mktemp("g3"), num_hidden_layers=6, layer_types=None)


def reference(folder, gguf_path):
    """transformers' model of the folder, with the GGUF file's dequantized weights put in."""
    from transformers import AutoModelForCausalLM

    from slmkit.loading.gguf import hf_name

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    f = open_gguf(gguf_path)
    state = model.state_dict()
    for name in f.tensors:
        target = hf_name(f.architecture, name)
        if target is None:
            continue
        t = f.tensor(name)
        state[target] = t - 1 if f.architecture == "gemma3" and target.endswith("norm.weight") else t
        if target == "model.embed_tokens.weight" and "lm_head.weight" in state:
            state["lm_head.weight"] = state[target] if "output.weight" not in f.tensors else state["lm_head.weight"]
    model.load_state_dict(state)
    return model


def ids_of(n, vocab, seed=1):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind", ["gqa", "longrope", "gemma3"])
def test_gguf_logits_match_transformers_on_dequantized_weights(kind, qtype, phi3_folders, gemma_folder, tmp_path):
    folder = gemma_folder if kind == "gemma3" else phi3_folders(kind)
    path = hf_to_gguf(folder, tmp_path / f"{kind}-{qtype}.gguf", qtype)
    llm = slmkit.load(path, dtype="float32", quant="none")
    ids = ids_of(40, llm.engine.vocab_size)  # 40 > LongRoPE original_max 32 and > Gemma's window 8
    with torch.no_grad():
        theirs = reference(folder, path)(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4
    if qtype != "F32":  # the quantization really happened
        types = {i.type_name for i in open_gguf(path).tensors.values()}
        assert qtype in types


def test_gguf_tokenizer_and_template_from_metadata(phi3_folders, tmp_path):
    folder = phi3_folders("gqa")
    path = hf_to_gguf(folder, tmp_path / "t.gguf")
    hf, gg = slmkit.load(folder, dtype="float32"), slmkit.load(path, dtype="float32")
    text = "Hello, can you call some tools for me? Grüße 你好 🦀"
    assert gg.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert gg.tokenizer.chat_template == hf.tokenizer.chat_template
    assert gg.tokenizer.token_to_id("<|end|>") in gg.engine.eos_token_ids
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    assert gg.chat(msgs, max_new_tokens=8, ignore_eos=True).token_ids == \
        hf.chat(msgs, max_new_tokens=8, ignore_eos=True).token_ids


@pytest.mark.parametrize("kind", ["gqa", "gemma3"])
def test_llama_cpp_reads_our_converter_output_the_same_way(kind, phi3_folders, gemma_folder, tmp_path):
    """llama.cpp on the same F32 file: the metadata means to it what it means to us."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = gemma_folder if kind == "gemma3" else phi3_folders(kind)
    path = hf_to_gguf(folder, tmp_path / f"{kind}.gguf")
    llm = slmkit.load(path, dtype="float32")
    ids = ids_of(24, llm.engine.vocab_size, seed=5)
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    ref.eval(ids)
    theirs = torch.tensor(np.array(ref.scores[: len(ids)]))
    ours = llm.logits(ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.95
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()


def test_cli_runs_an_ollama_store_model(phi3_folders, tmp_path, monkeypatch, capsys):
    blob = hf_to_gguf(phi3_folders("gqa"), tmp_path / "model.gguf", "Q8_0").read_bytes()
    store = tmp_path / "ollama"
    digest = hashlib.sha256(blob).hexdigest()
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(blob)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    rc = main(["run", "ollama:tiny", "Why is the sky blue?", "--max-tokens", "6", "--dtype", "float32"])
    out, _ = capsys.readouterr()
    llm = slmkit.load(store / "blobs" / f"sha256-{digest}", dtype="float32")
    expected = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=6).text
    assert rc == 0 and out == expected + "\n"


def test_unsupported_gguf_architecture(tmp_path):
    from slmkit.errors import UnsupportedModelError
    from tests.helpers.gguf_files import write_gguf

    path = write_gguf(tmp_path / "x.gguf", "mamba", {}, {"w": (np.zeros((4, 32), np.float32), "F32")})
    with pytest.raises(UnsupportedModelError, match="mamba"):
        slmkit.load(path)


@pytest.mark.parametrize("key, value", [("phi3.attention.head_count", 0), ("phi3.attention.head_count", "8"),
                                        ("phi3.rope.dimension_count", "16"), ("phi3.context_length", -1),
                                        ("phi3.rope.freq_base", "x")])
def test_bad_gguf_metadata_is_a_config_error_naming_the_key(key, value, tmp_path):
    from slmkit.errors import ConfigError
    from tests.helpers.gguf_files import write_gguf

    meta = {"phi3.context_length": 64, "phi3.embedding_length": 32, "phi3.feed_forward_length": 64,
            "phi3.block_count": 1, "phi3.attention.head_count": 2, "phi3.rope.dimension_count": 16,
            "phi3.rope.freq_base": 10000.0}
    meta[key] = value
    tensors = {"token_embd.weight": (np.zeros((64, 32), np.float32), "F32")}
    path = write_gguf(tmp_path / "bad.gguf", "phi3", meta, tensors)
    with pytest.raises(ConfigError) as e:
        slmkit.load(path)
    assert e.value.field == key


def _tiny_phi3_meta(**changes):
    meta = {"phi3.context_length": 64, "phi3.embedding_length": 32, "phi3.feed_forward_length": 64,
            "phi3.block_count": 1, "phi3.attention.head_count": 2, "phi3.rope.dimension_count": 16,
            "phi3.rope.freq_base": 10000.0}
    meta.update(changes)
    return meta


@pytest.mark.parametrize("changes, field", [
    ({"phi3.block_count": 100000}, "phi3.block_count"),  # must fail at once, not build 100k layers
    ({"phi3.attention.head_count": 256}, "phi3.attention.head_count"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "tokenizer.ggml.eos_token_id"),
])
def test_inconsistent_gguf_metadata(changes, field, tmp_path):
    import time

    from slmkit.errors import ConfigError
    from tests.helpers.gguf_files import write_gguf

    path = write_gguf(tmp_path / "bad.gguf", "phi3", _tiny_phi3_meta(**changes),
                      {"token_embd.weight": (np.zeros((64, 32), np.float32), "F32"),
                       "blk.0.attn_norm.weight": (np.ones(32, np.float32), "F32")})
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        slmkit.load(path)
    assert e.value.field == field and time.perf_counter() - t < 5


def test_gguf_shape_error_names_the_file_tensor(phi3_folders, tmp_path):
    from slmkit.errors import WeightError
    from tests.helpers.gguf_files import write_gguf
    from tests.helpers.gguf_models import hf_to_gguf

    good = open_gguf(hf_to_gguf(phi3_folders("gqa"), tmp_path / "good.gguf"))
    tensors = {n: (good.tensor(n).numpy(), "F32") for n in good.tensors}
    qkv = tensors["blk.0.attn_qkv.weight"][0]
    tensors["blk.0.attn_qkv.weight"] = (qkv[:-32], "F32")
    meta = {k: v for k, v in good.metadata.items() if not k.startswith("general.architecture")}
    path = write_gguf(tmp_path / "cut.gguf", "phi3", meta, tensors)
    with pytest.raises(WeightError) as e:
        slmkit.load(path)
    assert e.value.tensor == "blk.0.attn_qkv.weight"


def test_gguf_token_not_utf8_is_a_gguf_error_at_load(phi3_folders, tmp_path):
    """The loader reads string arrays lazily (gguf/strings.py): a token that is not UTF-8 is still refused
    at load with the reader's error, loaded once before (its cache written) or not."""
    from slmkit.gguf import GGUFError
    from tests.helpers.gguf_files import copy_file, gguf_layout, patch_bytes

    good = hf_to_gguf(phi3_folders("gqa"), tmp_path / "good.gguf")
    slmkit.load(good)  # writes the load cache of the good file
    for i, path in enumerate((copy_file(good, tmp_path / "bad.gguf"), good)):
        patch_bytes(path, gguf_layout(path).kv["tokenizer.ggml.tokens"].array_items + 8, b"\xff")
        with pytest.raises(GGUFError) as e:
            slmkit.load(path)
        assert e.value.field == "tokenizer.ggml.tokens" and "string [0] is not valid UTF-8" in str(e.value), i


def test_gemma3_gguf_linear_rope_scaling_is_read(gemma_folder, tmp_path):
    from tests.helpers.gguf_files import write_gguf
    from tests.helpers.gguf_models import hf_to_gguf

    src = open_gguf(hf_to_gguf(gemma_folder, tmp_path / "g.gguf"))
    meta = {k: v for k, v in src.metadata.items() if k != "general.architecture"}
    meta |= {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    path = write_gguf(tmp_path / "g8.gguf", "gemma3", meta, {n: (src.tensor(n).numpy(), "F32") for n in src.tensors})
    plain, scaled = slmkit.load(src.path, dtype="float32"), slmkit.load(path, dtype="float32")
    rp, rs = plain.engine.args.rope_global, scaled.engine.args.rope_global
    assert torch.allclose(rs.inv_freq * 8, rp.inv_freq)
    assert torch.equal(scaled.engine.args.rope_local.inv_freq, plain.engine.args.rope_local.inv_freq)


def test_missing_gguf_path_is_named_as_a_gguf_error(tmp_path):
    from slmkit.errors import ModelFileError

    with pytest.raises(ModelFileError, match="nope.gguf") as e:
        slmkit.load(tmp_path / "nope.gguf")
    assert "folder" not in str(e.value)


def test_each_gguf_architecture_is_described_by_its_model_file():
    """Adding an architecture = its model file (config, weights, GGUF names and keys) + a registry
    line: the loader holds no per-architecture table."""
    from pathlib import Path

    import slmkit.loading.gguf as loader
    from slmkit.models import GGUF_ARCHITECTURES, get_model_module

    for arch, name in GGUF_ARCHITECTURES.items():
        module = get_model_module(name)
        assert callable(module.gguf_config) and module.GGUF_LAYER_NAMES
        assert all(v.split(".")[0] in ("self_attn", "mlp", "block_sparse_moe") or v.endswith("layernorm")
                   for v in module.GGUF_LAYER_NAMES.values())
        assert f'"{arch}"' not in Path(loader.__file__).read_text()
