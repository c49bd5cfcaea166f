"""QuantEmbedding: a GGUF embedding table looked up in its quantized form gives the rows of the
dequantized table (slmkit.gguf.quants, as ggml) bit for bit, in float32 and bfloat16; a GGUF model
run quantized keeps its (tied) embedding that way and gives the logits of the dequantized one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slmkit
from slmkit.gguf.quants import dequantize
from slmkit.quant.gguf_repack import repack
from slmkit.quant.linear import QuantEmbedding, QuantLinear
from tests.helpers.gguf_files import qtype, random_blocks
from tests.helpers.gguf_models import hf_to_gguf

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_equals_the_dequantized_table(type_name, dtype):
    shape = (37, 256)  # rows not a multiple of the 16-row tile
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(5)))
                           .reshape(-1).copy())
    qw = repack(raw, int(qtype(type_name)), shape)
    assert qw is not None
    table = dequantize(raw, int(qtype(type_name)), shape, dtype)
    emb = QuantEmbedding(qw, dtype)
    ids = torch.tensor([[0, 36, 17, 17, 5], [31, 32, 15, 16, 0]])  # repeats, tile borders, the last row
    out = emb(ids)
    assert out.dtype == dtype and out.shape == (2, 5, 256)
    want = torch.nn.functional.embedding(ids, table)
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert emb(torch.arange(37)).equal(table)
    for i in (0, 15, 16, 36):  # one id (a decode step): its own path, the same rows
        assert emb(torch.tensor([[i]])).equal(table[i].view(1, 1, -1)) and emb(torch.tensor(i)).equal(table[i])
    assert emb(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 256)  # no ids: no rows
    with pytest.raises(IndexError):
        emb(torch.tensor([37]))
    with pytest.raises(IndexError):
        emb(torch.tensor([[-1]]))


@pytest.mark.parametrize(("kind", "qtype_name"), [("gqa", "Q4_0"), ("gemma3", "Q8_0")])
def test_gguf_model_keeps_its_embedding_quantized(kind, qtype_name, phi3_folders, tmp_path, monkeypatch):
    from tests.helpers.tiny_models import make_gemma3_folder

    folder = make_gemma3_folder(tmp_path / "g3", num_hidden_layers=2, layer_types=None) if kind == "gemma3" \
        else phi3_folders(kind)
    path = hf_to_gguf(folder, tmp_path / f"{kind}.gguf", qtype_name)
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", "off")
    llm = slmkit.load(path, dtype="float32")
    model = llm.engine.model
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding)
    if kind == "gemma3":  # tied: the head's very buffers, no float table anywhere
        assert isinstance(model.lm_head, QuantLinear) and emb.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    assert not any(p.numel() >= emb.num_embeddings for p in model.parameters())
    d, full = llm.describe(), slmkit.load(path, dtype="float32", quant="none").describe()
    assert d.parameters == full.parameters  # the quantized table counted once, as n x k
    assert d.weight_bytes < full.weight_bytes
    # the same run with the embedding given as the dequantized float table
    ids = torch.randint(3, emb.num_embeddings, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    got = llm.logits(ids)
    from slmkit.gguf import open_gguf

    table = open_gguf(path).tensor("token_embd.weight", torch.float32)
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(table)
    assert torch.equal(got, llm.logits(ids))


def test_quantize_from_a_gguf_keeps_the_quantized_embedding(tmp_path, monkeypatch):
    from slmkit.cli import main
    from tests.helpers.tiny_models import make_gemma3_folder

    folder = make_gemma3_folder(tmp_path / "g3", num_hidden_layers=2, layer_types=None)
    path = hf_to_gguf(folder, tmp_path / "g.gguf", "Q4_0")
    dst = tmp_path / "q"
    assert main(["quantize", str(path), str(dst), "--quant", "int8"]) == 0
    a, b = slmkit.load(path, dtype="float32", quant="int8"), slmkit.load(dst, dtype="float32")
    emb, theirs = b.engine.model.model.embed_tokens, a.engine.model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.bits == 4
    assert torch.equal(emb.qweight, theirs.qweight) and torch.equal(emb.scales, theirs.scales)
    ids = torch.randint(3, emb.num_embeddings, (12,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(emb(ids), theirs(ids))
    # (the folder's norms went through `slm quantize`'s bfloat16 load, so the logits differ a little)
    x, y = a.logits(ids.tolist()), b.logits(ids.tolist())
    assert ((x - y).norm(dim=-1) / x.norm(dim=-1)).max().item() < 0.05
