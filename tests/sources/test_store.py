"""slm import / list / show / rm and the CLI around the store: names that would leave the store are
refused, imported files are never deleted, --json outputs carry the contract's keys."""
from __future__ import annotations

import json

import numpy as np
import pytest

from slmkit import cli
from slmkit.errors import InvalidRequestError, MemoryPlanError, ModelFileError, UnknownModelError
from slmkit.loading import memory
from slmkit.sources import store
from tests.helpers.gguf_files import write_gguf
from tests.helpers.hubfake import Fake, serve
from tests.sources.test_catalog_plan import _tiny_folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 1 << 40)
    return tmp_path / "home"


def _gguf(tmp_path):
    meta = {"llama.block_count": 2, "llama.attention.head_count": 2, "llama.embedding_length": 16,
            "llama.context_length": 128, "general.license": "apache-2.0",
            "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    return write_gguf(tmp_path / "small.gguf", "llama", meta, {"w": (np.ones((4, 16), np.float32), "F16")})


def test_import_list_show_rm_never_copy_or_delete_the_users_files(home, tmp_path, capsys):
    folder, gguf = _tiny_folder(tmp_path), _gguf(tmp_path)
    assert cli.main(["import", str(folder)]) == 0
    assert cli.main(["import", str(gguf), "--name", "my-small"]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"tiny", "my-small"} and rows["my-small"]["size"] == gguf.stat().st_size
    assert rows["tiny"]["quant"] == "float32" and rows["my-small"]["quant"] == "F16" and rows["tiny"]["modified"] > 0
    assert not (home / "models").exists()  # registered, not copied
    assert cli.main(["show", "my-small", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["architecture"], info["parameters"], info["context"], info["licence"]) == ("llama", 64, 128,
                                                                                            "apache-2.0")
    assert info["capabilities"] == ["completion", "chat"] and "messages" in info["template"]
    assert cli.main(["rm", "my-small"]) == 0 and cli.main(["rm", "tiny"]) == 0
    assert gguf.exists() and (folder / "model.safetensors").exists() and store.list_models() == []


def test_show_a_catalog_entry_not_pulled_yet(home, capsys):
    assert cli.main(["show", "phi3.5-vision", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["installed"] and info["licence"] == "MIT" and "vision" in info["capabilities"]
    assert info["catalog"]["variants"]["onnx-int4"]["repo"] == "microsoft/Phi-3.5-vision-instruct-onnx"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "ok/..", ".", "a\\..\\b", ""])
def test_store_names_that_leave_the_store_are_refused(home, name):
    with pytest.raises(InvalidRequestError):
        store.check_name(name)
    with pytest.raises(InvalidRequestError):
        store.remove(name)
    with pytest.raises(InvalidRequestError):
        store.folder_for(name)


def test_rm_refuses_an_entry_whose_path_left_the_store(home, tmp_path):
    victim = tmp_path / "precious.gguf"
    victim.write_bytes(b"GGUF")
    store.register("phi3.5:bf16", victim, source="hf:x", fmt="gguf", quant=None, imported=False)  # a tampered index
    with pytest.raises(InvalidRequestError, match="outside the store"):
        store.remove("phi3.5")
    assert victim.exists()
    with pytest.raises(UnknownModelError, match="not in the store"):
        store.remove("phi4")


def test_import_refuses_what_is_not_a_model(home, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for p in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "missing"):
        with pytest.raises(ModelFileError):
            store.import_path(p)


def test_cli_catalog_and_plan_json(home, capsys):
    assert cli.main(["catalog", "--json"]) == 0
    names = [e["name"] for e in json.loads(capsys.readouterr().out)]
    assert "phi4-multimodal" in names and "builtin" in names
    assert cli.main(["plan", "phi4-mini", "--quant", "int4", "--ctx", "8192", "--parallel", "2", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kv_bytes"] == 2 * 32 * 8 * 128 * 2 * 8192 * 2 and p["fits"] is True
    assert p["total_bytes"] == p["weights_bytes"] + p["kv_bytes"] and p["available_bytes"] == 1 << 40
    assert cli.main(["plan", "phi3.6"]) == 1
    assert "did you mean phi3.5" in capsys.readouterr().err


def test_run_resolves_a_catalog_name_pulling_it_without_a_terminal(home, tmp_path, monkeypatch, capsys):
    from slmkit import cli_store

    fake = Fake()
    server, url = serve(fake)
    monkeypatch.setenv("HF_ENDPOINT", url)
    data = _gguf(tmp_path).read_bytes()
    fake.hub["microsoft/Phi-3-mini-4k-instruct-gguf"] = {"Phi-3-mini-4k-instruct-q4.gguf": data}
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    try:
        path = cli_store.prepare("phi3:mini:q4", yes=False, quant=None)
        err = capsys.readouterr().err
        assert "no terminal to ask: proceeding" in err and f"{len(data)} B in 1 file" in err
        assert store.find("phi3:mini:q4")["path"] == path and open(path, "rb").read() == data
        fake.seen.clear()
        assert cli_store.prepare("phi3:mini:q4", yes=False, quant=None) == path  # local first: no request
        assert fake.seen == []
    finally:
        server.shutdown()


def test_run_refuses_a_local_model_that_does_not_fit(home, tmp_path, monkeypatch):
    from slmkit import cli_store

    folder = _tiny_folder(tmp_path)
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 100 * 2**20)  # under the 512 MiB headroom
    with pytest.raises(MemoryPlanError, match="does not fit"):
        cli_store.prepare(str(folder), yes=True, quant=None)
    assert cli.main(["run", str(folder), "hi"]) == 1


def test_a_misspelt_name_suggests_catalog_names_and_store_names_plan(home, tmp_path, capsys):
    from slmkit.sources.resolve import resolve_model_path

    with pytest.raises(ModelFileError, match="did you mean phi3.5"):
        resolve_model_path("phi3.6")
    with pytest.raises(ModelFileError, match="not pulled yet: `slm pull phi4-mini`"):
        resolve_model_path("phi4-mini")
    store.import_path(_tiny_folder(tmp_path), "mine")
    assert cli.main(["plan", "mine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 6410
