"""Several models behind one server: keep-alive, unload (memory really freed), reload, max_loaded,
Ollama's keep_alive / empty-prompt load and unload, /api/ps, routing by model name."""
from __future__ import annotations

import gc
import time
import weakref

import pytest

import slmkit
from slmkit.errors import InvalidRequestError, ModelUnavailableError
from slmkit.server.registry import ModelSpec, Registry, parse_keep_alive

pytest.importorskip("fastapi")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.server.test_app import serve_models  # noqa: E402


@pytest.mark.parametrize("value,seconds", [(300, 300.0), (0, 0.0), (-1, None), ("5m", 300.0), ("1h30m", 5400.0),
                                           ("10s", 10.0), ("250ms", 0.25), ("-1", None), ("-5m", None), ("0", 0.0),
                                           ("2.5", 2.5), (1.5, 1.5), ("99999999h", None), (1e12, None)])
def test_parse_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", "5x", True, None, [1], float("inf"), float("nan"), "nan"])
def test_parse_keep_alive_rejects(value):
    with pytest.raises(InvalidRequestError) as e:
        parse_keep_alive(value)
    assert e.value.param == "keep_alive"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.helpers.tiny_models import make_gemma3_folder, make_phi3_folder

    root = tmp_path_factory.mktemp("models")
    return {"phi": make_phi3_folder(root / "phi", "gqa"), "gemma": make_gemma3_folder(root / "gemma")}


def spec(folder, loads: list, slots: int = 1) -> ModelSpec:
    def load():
        loads.append(folder)
        llm = slmkit.load(folder, dtype="float32")
        if slots > 1:
            llm.enable_batching(slots, 256)
        return llm
    return ModelSpec(load, slots)


def test_unload_frees_the_model_and_a_request_reloads_it(folders):
    loads: list = []
    reg = Registry({"phi": spec(folders["phi"], loads, slots=2)}, keep_alive=None)
    try:
        assert loads == [folders["phi"]] and reg.entry("phi").loaded  # preloaded
        llm, load_s = reg.acquire("phi")
        assert load_s == 0.0
        batch_thread = llm.backend.batch._thread
        ref = weakref.ref(llm.backend.engine.model)
        reg.release("phi")
        del llm
        assert reg.unload("phi") and not reg.entry("phi").loaded
        gc.collect()
        assert ref() is None  # the weights are gone, not just unreferenced by the registry
        batch_thread.join(timeout=10)
        assert not batch_thread.is_alive()  # the batching thread stopped
        llm, load_s = reg.acquire("phi")
        assert load_s > 0 and len(loads) == 2 and llm.chat([{"role": "user", "content": "hi"}],
                                                            max_new_tokens=3).usage.completion_tokens >= 1
        reg.release("phi")
    finally:
        reg.close()


def test_keep_alive_expiry_waits_for_running_requests(folders):
    loads: list = []
    reg = Registry({"phi": spec(folders["phi"], loads)}, keep_alive=0.3)
    try:
        reg.acquire("phi")
        time.sleep(0.8)
        assert reg.entry("phi").loaded  # in use: never unloaded under a request
        reg.release("phi")
        for _ in range(40):
            if not reg.entry("phi").loaded:
                break
            time.sleep(0.1)
        assert not reg.entry("phi").loaded  # idle past keep_alive: unloaded by the reaper
        reg.acquire("phi")
        reg.release("phi", keep_alive=0)  # Ollama's keep_alive 0: unloaded when the request ends
        assert not reg.entry("phi").loaded and len(loads) == 2
    finally:
        reg.close()


def test_max_loaded_unloads_the_least_recently_used_idle_model(folders):
    loads: list = []
    reg = Registry({"phi": spec(folders["phi"], loads), "gemma": spec(folders["gemma"], loads)},
                   max_loaded=1, preload=False)
    try:
        reg.acquire("phi")
        with pytest.raises(ModelUnavailableError) as e:  # phi is busy: gemma cannot evict it
            reg.acquire("gemma")
        assert e.value.busy
        reg.release("phi")
        reg.acquire("gemma")
        assert [x.name for x in reg.loaded()] == ["gemma"]
        reg.release("gemma")
    finally:
        reg.close()


def test_a_failing_loader_is_a_named_error():
    def broken():
        raise FileNotFoundError("no such folder: /nowhere")

    with pytest.raises(ModelUnavailableError, match="'x' failed to load: no such folder"):
        Registry({"x": ModelSpec(broken)})


def test_two_models_ollama_keep_alive_and_ps(folders):
    loads: list = []
    models = {"phi": spec(folders["phi"], loads, slots=2), "gemma": spec(folders["gemma"], loads)}
    base, srv, t = serve_models(models)
    try:
        solo = {n: slmkit.load(f, dtype="float32") for n, f in folders.items()}
        msgs = [{"role": "user", "content": "Say something."}]
        oa = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        for name in ("phi", "gemma"):  # each name reaches its own model
            r = oa.chat.completions.create(model=name, messages=msgs, max_tokens=6, temperature=0)
            assert r.choices[0].message.content == solo[name].chat(msgs, max_new_tokens=6, temperature=0).text
        assert sorted(m.id for m in oa.models.list().data) == ["gemma", "phi"]
        c = ollama.Client(host=base, headers={"Authorization": "Bearer k"})
        ps = {m.model: m for m in c.ps().models}
        assert set(ps) == {"phi", "gemma"} and ps["phi"].size > 0 and ps["phi"].context_length == 256
        assert ps["phi"].expires_at.year == 9999  # kept loaded: no keep-alive
        r = c.generate(model="gemma", prompt="", keep_alive=0)  # Ollama's way to unload
        assert r.done_reason == "unload"
        assert [m.model for m in c.ps().models] == ["phi"]
        assert {m.model for m in c.list().models} == {"phi", "gemma"}  # still served, just not loaded
        r = c.chat(model="gemma", messages=msgs, options={"temperature": 0, "num_predict": 4}, keep_alive="10m")
        assert r.load_duration > 0 and len(loads) == 3  # reloaded by the request, and the time is reported
        ps = {m.model: m for m in c.ps().models}
        left = ps["gemma"].expires_at.timestamp() - time.time()
        assert 500 < left <= 600  # keep_alive "10m" from the request
        assert c.generate(model="phi", prompt="").done_reason == "load"
        metrics = httpx.get(base + "/metrics", headers={"Authorization": "Bearer k"}).text
        assert 'slmkit_model_loads_total{model="gemma"} 2' in metrics
        assert 'slmkit_model_unloads_total{model="gemma"} 1' in metrics  # Ollama's keep_alive 0 above
        assert 'slmkit_model_loaded{model="phi"} 1' in metrics
        bad = httpx.post(base + "/api/generate", headers={"Authorization": "Bearer k"},
                         json={"model": "phi", "prompt": "hi", "keep_alive": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def test_num_ctx_caps_the_request(folders):
    loads: list = []
    base, srv, t = serve_models({"phi": spec(folders["phi"], loads)})
    try:
        oa = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        msgs = [{"role": "user", "content": "word " * 40}]
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model="phi", messages=msgs, max_tokens=4, extra_body={"num_ctx": 16})
        assert e.value.body["code"] == "context_length_exceeded"
        r = oa.chat.completions.create(model="phi", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                       temperature=0, extra_body={"num_ctx": 40, "min_tokens": 200})
        assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 40
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def test_parameter_count_includes_quantized_linears(folders):
    counts = []
    for quant in (None, "int8"):
        reg = Registry({"m": slmkit.load(folders["gemma"], dtype="float32", quant=quant)})  # tied embeddings
        counts.append(reg.entry("m").info["params"])
        reg.close()
    model = slmkit.load(folders["gemma"], dtype="float32").engine.model  # the tied head counts once
    once = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lm_head"))
    assert counts[0] == counts[1] == once and model.model.embed_tokens.weight.numel() < once
