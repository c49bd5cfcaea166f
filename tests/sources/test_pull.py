"""slm pull against local stand-ins for the Hugging Face hub (HF_ENDPOINT) and an Ollama registry:
downloads land in $SLMKIT_HOME, an interrupted pull resumes with a range request, a corrupt file is
detected by its sha256 and fetched again, offline fails fast, the memory plan refuses first."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from slmkit.errors import DownloadError, MemoryPlanError
from slmkit.loading import memory
from slmkit.sources import pull, store
from slmkit.sources.resolve import resolve_model_path
from tests.helpers.hubfake import Fake, serve, sha

GGUF_REPO, GGUF_FILE = "microsoft/Phi-3-mini-4k-instruct-gguf", "Phi-3-mini-4k-instruct-q4.gguf"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 1 << 40)  # the catalog's models "fit"
    return tmp_path / "home"


@pytest.fixture
def fake(monkeypatch):
    f = Fake()
    server, url = serve(f)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("SLMKIT_OLLAMA_REGISTRY", url)
    yield f
    f.server.shutdown()


def _payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def test_pull_a_catalog_folder_checks_sha256_and_registers_it(home, fake):
    weights = _payload(300_000)
    fake.hub["microsoft/Phi-3.5-mini-instruct"] = {"config.json": b'{"model_type": "phi3"}',
                                                   "model.safetensors": weights, "notes/skip.bin": b"x",
                                                   "pytorch_model.bin": b"old format, not fetched"}
    entry = pull.pull("phi3.5", out=open("/dev/null", "w"))
    folder = Path(entry["path"])
    assert entry["name"] == "phi3.5:bf16" and folder.is_relative_to(home)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert not (folder / "pytorch_model.bin").exists() and not (folder / "notes").exists()
    assert resolve_model_path("phi3.5") == folder  # `slm run phi3.5` now finds it locally
    assert [r["name"] for r in store.list_models()] == ["phi3.5:bf16"]


def test_an_interrupted_hub_download_resumes_where_it_stopped(home, fake):
    data = _payload(2_000_000, 7)
    fake.hub[GGUF_REPO] = {GGUF_FILE: data}
    fake.cut[GGUF_FILE] = 700_000  # the server dies after 700 kB of the file
    port = fake.server.server_address[1]
    with pytest.raises(DownloadError, match="resume"):
        pull.pull("phi3:mini:q4", out=open("/dev/null", "w"))
    serve(fake, port)  # restarted
    fake.seen.clear()
    entry = pull.pull("phi3:mini:q4", out=open("/dev/null", "w"))
    assert Path(entry["path"]).read_bytes() == data
    ranges = [r for m, p, r in fake.seen if m == "GET" and p.endswith(GGUF_FILE)]
    assert ranges and ranges[0] is not None and int(ranges[0].split("=")[1].rstrip("-")) >= 500_000, ranges


def test_a_corrupt_hub_file_is_fetched_again_and_twice_corrupt_is_refused(home, fake):
    data = _payload(50_000, 3)
    fake.hub[GGUF_REPO] = {GGUF_FILE: data}
    fake.corrupt[GGUF_FILE] = 1
    entry = pull.pull("phi3:mini:q4", out=open("/dev/null", "w"))
    assert Path(entry["path"]).read_bytes() == data
    store.remove("phi3:mini:q4")
    fake.corrupt[GGUF_FILE] = 2
    with pytest.raises(DownloadError, match="sha256"):
        pull.pull("phi3:mini:q4", out=open("/dev/null", "w"))
    assert store.find("phi3:mini:q4") is None


def test_offline_fails_within_about_a_second(home, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SLMKIT_OLLAMA_REGISTRY", f"http://127.0.0.1:{port}")
    for spec in ("phi3.5", "ollama:phi3.5"):
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match="cannot reach"):
            pull.pull(spec, out=open("/dev/null", "w"))
        assert time.monotonic() - t0 < 1.5


def test_the_memory_plan_refuses_before_any_download(home, fake, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 12 * 2**30)
    fake.hub["microsoft/Phi-3-medium-4k-instruct"] = {"config.json": b"{}"}
    with pytest.raises(MemoryPlanError, match="does not fit.*--quant int4"):
        pull.pull("phi3:medium", out=open("/dev/null", "w"))
    assert fake.seen == []


def test_a_missing_file_or_repo_is_named(home, fake):
    fake.hub[GGUF_REPO] = {"other.gguf": b"x"}
    with pytest.raises(DownloadError, match=GGUF_FILE):
        pull.pull("phi3:mini:q4", out=open("/dev/null", "w"))
    with pytest.raises(DownloadError, match="refused"):
        pull.pull("phi4", out=open("/dev/null", "w"))


def test_a_declined_confirmation_downloads_nothing(home, fake):
    fake.hub[GGUF_REPO] = {GGUF_FILE: _payload(10_000)}
    said = []
    with pytest.raises(DownloadError, match="declined"):
        pull.pull("phi3:mini:q4", confirm=lambda m: said.append(m) or False, out=open("/dev/null", "w"))
    assert "10.0 KB" in said[0] and GGUF_REPO in said[0]
    assert not any(p.endswith(GGUF_FILE) for m, p, r in fake.seen if m == "GET")


# ------------------------------------------------------------------ Ollama registry
def test_ollama_pull_verifies_digests_resumes_and_refetches_corrupt_blobs(home, fake):
    gguf = b"GGUF" + _payload(1_500_000, 5)
    fake.add_ollama("library/phi3.5:latest", gguf, {"application/vnd.ollama.image.template": b"{{ .Prompt }}"})
    fake.cut[sha(gguf)] = 600_000
    port = fake.server.server_address[1]
    with pytest.raises(DownloadError, match="resume"):
        pull.pull("ollama:phi3.5", out=open("/dev/null", "w"))
    serve(fake, port)
    fake.seen.clear()
    entry = pull.pull("ollama:phi3.5", out=open("/dev/null", "w"))
    blob = Path(entry["path"])
    assert entry["name"] == "ollama:phi3.5:latest" and blob.read_bytes() == gguf and entry["quant"] == "Q4_K_M"
    got = [r for m, p, r in fake.seen if p.endswith(sha(gguf))]
    assert got == ["bytes=600000-"], got
    assert resolve_model_path("ollama:phi3.5") == blob
    # a blob corrupted on disk is detected at the next pull and fetched again
    blob.write_bytes(b"GGUF" + b"\0" * (len(gguf) - 4))
    fake.corrupt[sha(gguf)] = 1  # and the first re-fetch is corrupt in transit too
    pull.pull("ollama:phi3.5", out=open("/dev/null", "w"))
    assert blob.read_bytes() == gguf
    store.remove("ollama:phi3.5:latest")
    assert not blob.exists()


def test_ollama_unknown_model_is_named(home, fake):
    with pytest.raises(DownloadError, match="no such model"):
        pull.pull("ollama:nothing:here", out=open("/dev/null", "w"))


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.parts = tty, []

    def isatty(self):
        return self.tty

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_progress_redraws_on_a_terminal_and_prints_plain_lines_otherwise(monkeypatch):
    from slmkit.sources import progress

    clock = iter(range(0, 1000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock) * 0.5)
    for tty in (False, True):
        s = _Stream(tty)
        bar = progress.Progress("model.gguf", 4_000_000, out=s)
        for _ in range(8):
            bar.update(500_000)
        bar.close()
        text = "".join(s.parts)
        if tty:
            assert text.count("\r") >= 8 and "4.0 MB" in text and "/s" in text
        else:
            lines = text.splitlines()
            assert "\r" not in text and len(lines) == 4  # 25 %, 50 %, 75 %, then the summary
            assert re.fullmatch(r"model\.gguf: 1\.0 MB of 4\.0 MB \(\d+\.\d KB/s\)", lines[0]), lines
            assert lines[-1].startswith("model.gguf: 4.0 MB in")


def test_slm_pull_on_the_command_line(home, fake, capsys):
    from slmkit import cli

    fake.hub[GGUF_REPO] = {GGUF_FILE: _payload(20_000)}
    assert cli.main(["pull", "phi3:mini:q9"]) == 1
    assert "its tags: bf16, q4, fp16, onnx-int4" in capsys.readouterr().err
    assert cli.main(["pull", "phi3:mini:q4", "--yes"]) == 0
    err = capsys.readouterr().err
    assert "20.0 KB in 1 file(s)" in err and "phi3:mini:q4: ready at" in err and "no terminal" not in err
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["phi3:mini:q4", "0.0", "GB"] and "q4_k_m" in out[1]
