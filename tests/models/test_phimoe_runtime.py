"""Phi-3.5-MoE in the rest of slmkit: routing you can look at, per-expert counters, the RAM plan,
memory-mapped experts, quantized experts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import slmkit
from slmkit.errors import InvalidRequestError, MemoryPlanError
from slmkit.quant.linear import QuantLinear
from tests.helpers.tiny_models import make_phimoe_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_phimoe_folder(tmp_path_factory.mktemp("moer") / "m", num_local_experts=6, router_jitter_noise=0.3)


def test_return_routing_gives_each_tokens_experts_and_weights(folder):
    llm = slmkit.load(folder, dtype="float32")
    prompt = list(range(5, 17))
    out = llm.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True, return_routing=True)
    assert out.routing is not None and len(out.routing) == len(out.token_ids) == 6
    # the first token's routing is the prompt's last position in a plain forward, layer by layer
    model = llm.engine.model
    h = model.model.embed_tokens(torch.tensor([prompt]))
    rope = model.rope.cos_sin(torch.arange(len(prompt))[None], "short", h.dtype)
    from slmkit.models.cache import Step

    step = Step.of(None, len(prompt), h.device)
    for i, layer in enumerate(model.model.layers):
        x = h + layer.self_attn(layer.input_layernorm(h), rope, step)
        ids, w = layer.block_sparse_moe.route(layer.post_attention_layernorm(x)[0])
        assert out.routing[0].experts[i] == ids[-1].tolist()
        assert out.routing[0].weights[i] == pytest.approx(w[-1].tolist())
        h = layer(h, rope, step, None)
    weights = [w for r in out.routing for layer in r.weights for w in layer]
    assert all(0 < w <= 1 for w in weights) and any(w < 1 for w in weights)  # a wide threshold mixes
    plain = llm.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert plain.routing is None and plain.token_ids == out.token_ids
    chunks = list(llm.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True, return_routing=True,
                               stream=True))
    assert [c.routing[0] for c in chunks if c.token_ids] == out.routing[:3]


def test_return_routing_is_refused_where_there_is_no_routing(phi3_folders, folder):
    dense = slmkit.load(phi3_folders("gqa"), dtype="float32")
    with pytest.raises(InvalidRequestError) as e:
        dense.generate([5, 6, 7], max_new_tokens=2, return_routing=True)
    assert e.value.param == "return_routing"


def test_return_routing_under_continuous_batching_equals_solo_runs(folder):
    """Concurrent requests in one batch: each gets its own row's routing, as when run alone."""
    import threading

    llm = slmkit.load(folder, dtype="float32")
    reqs = [list(range(5 + i, 9 + 3 * i)) for i in range(4)]
    kw = dict(max_new_tokens=5, temperature=0, ignore_eos=True, return_routing=True)
    solo = [llm.generate(p, **kw) for p in reqs]
    llm.enable_batching(slots=3, context=64)
    got: list = [None] * 4

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i], **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert llm.backend.batch.steps < sum(len(s.token_ids) for s in solo)  # steps were shared
    for g, s in zip(got, solo):
        assert g.token_ids == s.token_ids
        assert [r.experts for r in g.routing] == [r.experts for r in s.routing]
        for a, b in zip(g.routing, s.routing):
            assert all(gw == pytest.approx(sw) for gw, sw in zip(a.weights, b.weights))


def test_speculating_batch_rows_report_each_tokens_own_routing(folder):
    """Rows that verify drafts in the batch's pass: each token's routing is that of the position
    that chose it (as plain decoding alone gives it), beside a plain row."""
    import random
    import threading

    llm = slmkit.load(folder, dtype="float32")
    rng = random.Random(4)
    halves = [[rng.randrange(5, 300) for _ in range(12)] for _ in range(3)]
    reqs = [h + h for h in halves]  # self-repeating: prompt lookup finds drafts
    kw = dict(max_new_tokens=16, temperature=0, ignore_eos=True, return_routing=True)
    solo = [llm.generate(p, speculative="none", **kw) for p in reqs]
    with pytest.raises(InvalidRequestError) as e:  # alone, each token's routing needs a pass of its own
        llm.generate(reqs[0], speculative="ngram", **kw)
    assert e.value.param == "speculative"
    long = (halves[0] * 12)[:140]  # "auto" would draft for it: with routing it decodes plainly
    r = llm.generate(long, **dict(kw, max_new_tokens=6))
    assert r.usage.drafted_tokens == 0 and len(r.routing) == 6
    assert llm.generate(long, max_new_tokens=6, temperature=0, ignore_eos=True).usage.drafted_tokens > 0
    llm.enable_batching(slots=3, context=96)
    got: list = [None] * 3

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i], speculative="ngram" if i else "none", num_draft=4, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(g.usage.accepted_tokens for g in got) > 0  # runs of several tokens from one pass
    for g, s in zip(got, solo):
        assert g.token_ids == s.token_ids
        assert [r.experts for r in g.routing] == [r.experts for r in s.routing]
        for a, b in zip(g.routing, s.routing):
            assert all(gw == pytest.approx(sw) for gw, sw in zip(a.weights, b.weights))


def test_expert_hits_count_every_token_of_every_layer(folder):
    llm = slmkit.load(folder, dtype="float32")
    assert sum(map(sum, llm.stats().expert_hits)) == 0
    llm.generate(list(range(5, 15)), max_new_tokens=5, temperature=0, ignore_eos=True)
    hits = llm.stats().expert_hits
    # 10 prompt tokens + 4 fed back, 2 experts each, in each of 2 layers
    assert len(hits) == 2 and all(len(row) == 6 for row in hits)
    assert [sum(row) for row in hits] == [2 * 14, 2 * 14]


def test_metrics_expose_per_expert_hits(folder):
    from slmkit.server.registry import Registry
    from slmkit.server.routes_service import metrics_text

    reg = Registry({"moe": slmkit.load(folder, dtype="float32")}, keep_alive=None)
    reg.entries["moe"].llm.generate([5, 6, 7, 8], max_new_tokens=2, temperature=0, ignore_eos=True)
    text = metrics_text(reg)
    lines = [ln for ln in text.splitlines() if ln.startswith("slmkit_expert_hits_total{")]
    assert len(lines) == 2 * 6
    assert sum(int(ln.rsplit(" ", 1)[1]) for ln in lines if 'layer="0"' in ln) == 2 * 5


def test_ram_plan_per_precision_and_a_load_that_cannot_fit(folder, monkeypatch):
    llm = slmkit.load(folder, dtype="float32")
    plan = llm.describe().ram_needed
    assert plan["float32"] > plan["bfloat16"] > plan["int8"] > plan["int4"]
    on_disk = (folder / "model.safetensors").stat().st_size
    assert abs(plan["float32"] - on_disk) < 0.01 * on_disk
    import slmkit.loading.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: plan["int4"] + 1)
    with pytest.raises(MemoryPlanError) as e:
        slmkit.load(folder, dtype="float32", quant="int8")
    assert e.value.needed == plan["int8"] and "int4" in str(e.value)
    slmkit.load(folder, dtype="float32", quant="int4")  # fits
    slmkit.load(folder, dtype="float32")  # used as stored: mapped, no copy, no plan needed


def test_quantized_experts_int8_and_int4_and_slm_quantize(folder, tmp_path):
    """Each expert's linears become QuantLinear (the router stays float); the quantized model
    equals the float model holding the same dequantized weights, up to the kernel's int8
    activations (a flipped near-tie can move one whole position)."""
    ids = list(range(5, 25))
    for quant in ("int8", "int4"):
        llm = slmkit.load(folder, dtype="float32", quant=quant)
        moe = llm.engine.model.model.layers[0].block_sparse_moe
        assert all(isinstance(e.w1, QuantLinear) and isinstance(e.w2, QuantLinear) for e in moe.experts)
        assert not isinstance(moe.gate, QuantLinear)
        same = slmkit.load(folder, dtype="float32", pack=False)
        with torch.no_grad():
            for name, m in llm.engine.model.named_modules():
                if isinstance(m, QuantLinear):
                    same.engine.model.get_submodule(name).weight.copy_(m.dequantized())
        want = same.logits(ids)
        err = (llm.logits(ids) - want).abs().amax(-1) / want.abs().max()
        assert err.median().item() <= 0.03 and (err <= 0.05).float().mean().item() >= 0.75, (quant, err)
    from slmkit.api import quantize

    out, made = quantize(folder, tmp_path / "q4", quant="int4")  # `slm quantize`: the experts written quantized
    q = slmkit.load(out, dtype="float32")
    qmods = {n: m for n, m in q.engine.model.named_modules() if isinstance(m, QuantLinear)}
    assert sum(".experts." in n for n in qmods) == 2 * 6 * 3
    for name, m in made.engine.model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(qmods[name].dequantized(), m.dequantized()), name


_RSS = """
import json, sys, slmkit
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
slmkit.load(sys.argv[2], dtype='float32').generate([5, 6], max_new_tokens=2)  # imports, kernels: warm
before = anon()
llm = slmkit.load(sys.argv[1], dtype='float32')
after = anon()
llm.generate([5, 6, 7], max_new_tokens=2, temperature=0, ignore_eos=True)
print(json.dumps({"load_anon": after - before}))
"""


def test_loading_does_not_copy_the_experts(tmp_path):
    """float32 experts as stored are memory-mapped, not copied: loading a model whose experts are
    ~40 MB grows the process' anonymous memory by far less than that."""
    folder = make_phimoe_folder(tmp_path / "big", hidden_size=256, intermediate_size=1024, num_local_experts=8,
                                num_attention_heads=4, num_key_value_heads=2)
    expert_bytes = 2 * 8 * 3 * 256 * 1024 * 4
    small = make_phimoe_folder(tmp_path / "small")
    res = subprocess.run([sys.executable, "-c", _RSS, str(folder), str(small)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    grown = json.loads(res.stdout.strip().splitlines()[-1])["load_anon"]
    assert grown < 0.25 * expert_bytes, grown


def test_slm_run_show_experts_prints_a_table_per_layer(folder, capsys, phi3_folders):
    from slmkit.cli import main

    rc = main(["run", str(folder), "Hello there", "--max-tokens", "6", "--temperature", "0", "--dtype", "float32",
               "--show-experts"])
    out, err = capsys.readouterr()
    llm = slmkit.load(folder, dtype="float32")
    ans = llm.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=6, temperature=0, return_routing=True)
    assert rc == 0 and out == ans.text + "\n"
    rows = [ln for ln in err.splitlines() if ln.startswith("L0")]
    assert [r.split()[0] for r in rows] == ["L00", "L01"]
    for layer, row in enumerate(rows):  # each layer's counts: 2 choices per token, as the routing says
        counts = {int(c.split("×")[0][1:]): int(c.split("×")[1].split("(")[0]) for c in row.split()[1:]}
        want: dict[int, int] = {}
        for r in ans.routing:
            for e in r.experts[layer]:
                want[e] = want.get(e, 0) + 1
        assert counts == want
    assert main(["run", str(phi3_folders("gqa")), "Hi", "--max-tokens", "2", "--dtype", "float32",
                 "--show-experts"]) != 0
    assert "return_routing" in capsys.readouterr().err


def test_a_run_reads_only_the_experts_its_tokens_chose(folder):
    """Experts no token chose in a run are never touched: poisoning their weights with NaN leaves
    the same run's logits and tokens exactly as they were."""
    llm = slmkit.load(folder, dtype="float32", pack=False)
    model = llm.engine.model
    prompt = [5, 6, 7]
    before = model.routing.hits.clone()
    out = llm.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True, return_routing=True)
    used = model.routing.hits - before
    idle = [(layer, e) for layer in range(used.shape[0]) for e in range(used.shape[1]) if used[layer, e] == 0]
    assert idle, "every expert was used: the test needs a shorter run"
    ref = llm.logits(prompt + out.token_ids[:-1])
    with torch.no_grad():
        for layer, e in idle:
            for w in ("w1", "w2", "w3"):
                getattr(model.model.layers[layer].block_sparse_moe.experts[e], w).weight.fill_(float("nan"))
    assert torch.equal(llm.logits(prompt + out.token_ids[:-1]), ref)
    assert llm.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids == out.token_ids


def test_beam_search_sessions_and_structured_output_run_unchanged(folder):
    llm = slmkit.load(folder, dtype="float32")
    beams = llm.beam_search(list(range(5, 12)), num_beams=3, max_new_tokens=5)
    assert len(beams) == 1 and len(beams[0].token_ids) == 5
    chat = llm.session(max_new_tokens=6, temperature=0)
    chat.send("One question.")
    second = chat.send("Another one.")
    assert second.token_ids == llm.chat(chat.messages[:3], max_new_tokens=6, temperature=0).token_ids
    assert 0 < chat.last_prefill < chat.cached_tokens - len(second.token_ids)  # the first turn was reused
    out = llm.generate("Answer:", max_new_tokens=30, regex=r"[0-9]{3}", temperature=0)
    assert len(out.text) == 3 and out.text.isdigit()


def test_memory_plan_counts_mapped_experts_as_paged_unless_quantized(folder):
    from slmkit.sources.memplan import make_plan, shape_from_folder

    shape, precision = shape_from_folder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert shape.n_experts == 6 and shape.experts_per_token == 2
    assert shape.expert_params == 2 * 6 * 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    stored = make_plan(shape, precision, probe=False, available=None)
    expert_bytes = shape.expert_params * 4  # float32 files
    assert stored.paged_bytes == pytest.approx(expert_bytes * 4 / 6, rel=0.02)  # 4 of 6 per layer (+ file headers)
    assert stored.total_bytes == stored.weights_bytes - stored.paged_bytes + stored.kv_bytes
    assert "memory-mapped" in stored.message()
    tight = stored.total_bytes + 512 * 2**20 + 1  # fits only because the cold experts are paged
    assert make_plan(shape, precision, probe=False, available=tight).fits
    quantized = make_plan(shape, precision, quant="int4", probe=False, available=None)
    assert quantized.paged_bytes == 0 and "all resident" in quantized.message()
