"""The GGUF load cache (loading/gguf_cache.py): a repeated load is served from the cache and runs
exactly as a fresh load; a changed file (contents, header, mtime, size) or a damaged cache is never
served stale but rebuilt; the cache can be turned off; an unwritable cache folder only loses speed."""
from __future__ import annotations

import os

import pytest
import torch

import slmkit
from slmkit.gguf import open_gguf
from slmkit.loading import gguf as gguf_loading
from slmkit.loading import gguf_cache
from tests.helpers.gguf_models import hf_to_gguf

TEXT = "Hello, can you call some tools for me? Grüße 你好"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", str(root))
    return root


@pytest.fixture
def builds(monkeypatch):
    """Counts the loads that did the work (repack / convert) instead of reading the cache."""
    calls = []
    real = gguf_loading._load_work

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gguf_loading, "_load_work", counting)
    return calls


def ids_of(llm, n=24):
    return torch.randint(3, llm.engine.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()


def fresh(path, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv("SLMKIT_GGUF_CACHE", "off")
        return slmkit.load(path, **kw)


@pytest.mark.parametrize(("qtype", "kw"), [("Q4_0", {}), ("Q8_0", {}), ("F16", {"dtype": "float32"}),
                                           ("Q5_1", {"dtype": "float32", "quant": "none"})])
def test_repeated_load_is_served_from_the_cache_and_runs_identically(qtype, kw, phi3_folders, tmp_path, cache,
                                                                     builds, monkeypatch):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / f"m-{qtype}.gguf", qtype)
    first = slmkit.load(path, **kw)
    gguf_cache.wait()  # the cache is written on a thread of its own
    assert len(builds) == 1 and len(list(cache.glob("*.pt"))) == 1
    second = slmkit.load(path, **kw)
    assert len(builds) == 1  # served from the cache
    ref = fresh(path, monkeypatch, **kw)
    assert len(builds) == 2  # the cache off: built again
    ids = ids_of(ref)
    want = ref.logits(ids)
    assert torch.equal(first.logits(ids), want)
    assert torch.equal(second.logits(ids), want)
    assert second.tokenizer.encode(TEXT) == ref.tokenizer.encode(TEXT)
    assert second.tokenizer.chat_template == ref.tokenizer.chat_template
    assert second.engine.eos_token_ids == ref.engine.eos_token_ids
    # another load mode of the same file has its own cache entry
    slmkit.load(path, **({} if kw.get("quant") == "none" else {"dtype": "float32", "quant": "none"}))
    gguf_cache.wait()
    assert len(builds) == 3 and len(list(cache.glob("*.pt"))) == 2


def _flip_signs(path, offset, length=4096):
    """Negate the F16 values in [offset, offset + length) (finite stays finite), keeping size and mtime."""
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(offset - offset % 2)
        b = bytearray(fh.read(length))
        for i in range(1, len(b), 2):
            b[i] ^= 0x80
        fh.seek(offset - offset % 2)
        fh.write(b)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("change", ["sampled data, same size and mtime", "mtime only", "header, same size and mtime",
                                    "replaced by another type"])
def test_a_changed_file_is_never_served_stale(change, phi3_folders, tmp_path, cache, builds, monkeypatch):
    folder = phi3_folders("gqa")
    path = hf_to_gguf(folder, tmp_path / "m.gguf", "F16")
    kw = {"dtype": "float32"}
    ids = ids_of(slmkit.load(path, **kw))
    before = slmkit.load(path, **kw).logits(ids)
    assert len(builds) == 1
    f = open_gguf(path)
    start, size = f.data_offset, os.path.getsize(path)
    f.close()
    if change == "sampled data, same size and mtime":
        span = size - start - gguf_cache.SAMPLE_BYTES
        for i in range(gguf_cache.SAMPLES):  # every sampled block: the weights surely change
            _flip_signs(path, start + span * i // (gguf_cache.SAMPLES - 1), 64)
    elif change == "mtime only":
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "header, same size and mtime":
        st = os.stat(path)
        data = path.read_bytes()
        old = b"<|end|>"
        assert old in data[:start]
        path.write_bytes(data[:start].replace(old, b"<|eNd|>", 1) + data[start:])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        hf_to_gguf(folder, path, "Q8_0")
    after = slmkit.load(path, **kw)
    assert len(builds) == 2  # rebuilt, not served from the stale cache
    ref = fresh(path, monkeypatch, **kw)
    assert torch.equal(after.logits(ids), ref.logits(ids))
    assert after.tokenizer.encode(TEXT) == ref.tokenizer.encode(TEXT)
    if change == "sampled data, same size and mtime":
        assert not torch.equal(after.logits(ids), before)
    if change == "header, same size and mtime":
        assert after.tokenizer.token_to_id("<|eNd|>") is not None
    slmkit.load(path, **kw)
    assert len(builds) == 3  # the fresh (cache off) load; the rebuilt cache then serves this one


def test_a_damaged_cache_is_rebuilt(phi3_folders, tmp_path, cache, builds, monkeypatch):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / "m.gguf", "Q4_0")
    ids = ids_of(slmkit.load(path))
    gguf_cache.wait()
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated
    llm = slmkit.load(path)
    assert len(builds) == 2
    assert torch.equal(llm.logits(ids), fresh(path, monkeypatch).logits(ids))
    slmkit.load(path)
    assert len(builds) == 3  # the fresh load; the rewritten cache serves this one


def test_cache_off_writes_nothing_and_an_unwritable_folder_still_loads(phi3_folders, tmp_path, builds,
                                                                       monkeypatch):
    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / "m.gguf", "Q4_0")
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", "0")
    a = slmkit.load(path)
    slmkit.load(path)
    assert len(builds) == 2 and gguf_cache.cache_dir() is None
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", str(blocker / "cache"))
    b = slmkit.load(path)
    assert len(builds) == 3
    ids = ids_of(a)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_a_load_builds_the_model_without_initialising_it_or_importing_dynamo(tmp_path):
    """build_model constructs on the meta device with torch.nn.init skipped: the meta device's
    normal_ (nn.Embedding's init) imported torch._dynamo, ~2 s of a load and used by nothing else.
    In a fresh process, so that nothing imported it before; the skip is for that thread's build only."""
    import subprocess
    import sys

    from tests.helpers.tiny_models import make_gemma3_folder

    path = hf_to_gguf(make_gemma3_folder(tmp_path / "g3", num_hidden_layers=2, layer_types=None),
                      tmp_path / "g.gguf", "Q8_0")
    code = ("import sys, torch, slmkit\n"
            f"llm = slmkit.load({str(path)!r})\n"
            "assert llm.generate('Hi', max_new_tokens=2, ignore_eos=True).token_ids\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
            "e = torch.nn.Embedding(64, 8)\n"  # initialisation elsewhere is untouched
            "print('init' if e.weight.abs().sum() > 0 else 'zeros')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SLMKIT_GGUF_CACHE": "off"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["no", "dynamo", "init"]


def test_the_cache_is_written_while_the_model_runs_and_before_the_process_exits(phi3_folders, tmp_path, cache,
                                                                                 builds, monkeypatch):
    import subprocess
    import sys
    import threading

    path = hf_to_gguf(phi3_folders("gqa"), tmp_path / "m.gguf", "Q4_0")
    gate, real = threading.Event(), gguf_cache.write
    monkeypatch.setattr(gguf_cache, "write", lambda *a: gate.wait(60) and real(*a))
    llm = slmkit.load(path)  # returns with its cache write held at the gate
    assert llm.generate("Hi", max_new_tokens=2).token_ids and not list(cache.glob("*.pt"))
    gate.set()
    gguf_cache.wait()
    assert len(list(cache.glob("*.pt"))) == 1
    # a process that exits right after a first load still leaves the whole cache behind
    other = tmp_path / "cache2"
    code = f"import slmkit; slmkit.load({str(path)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SLMKIT_GGUF_CACHE": str(other)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(other.glob("*.pt"))) == 1
    assert not [p for p in other.iterdir() if p.name.startswith(".")]  # no temporary left over
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", str(other))
    again = slmkit.load(path)
    assert len(builds) == 1  # only the first load above built: this one read the other process's cache
    ids = ids_of(again)
    assert torch.equal(again.logits(ids), llm.logits(ids))


@pytest.mark.parametrize("value", ["1", "on", "TRUE", " yes "])
def test_cache_switched_on_is_the_usual_folder_not_one_named_after_the_switch(monkeypatch, tmp_path, value):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", value)
    on = gguf_cache.cache_dir()
    monkeypatch.delenv("SLMKIT_GGUF_CACHE")
    assert on == gguf_cache.cache_dir() == tmp_path / "home" / "gguf"
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", str(tmp_path / "1"))  # a path is still a path
    assert gguf_cache.cache_dir() == tmp_path / "1"
