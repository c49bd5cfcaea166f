"""The built-in model file: assembled once, verified, repaired when the cached copy is damaged."""
from __future__ import annotations

import os

import pytest

import slmkit
from slmkit.errors import ModelFileError
from slmkit.sources.builtin import builtin_model_path


def test_assembles_into_slmkit_home_readable_and_stamped(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    path = builtin_model_path()
    assert path.parent == tmp_path / "builtin" and path.stat().st_mode & 0o044 == 0o044
    assert builtin_model_path() == path  # second call: stamp matches, no re-hash


def test_damaged_cached_copy_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    path = builtin_model_path()
    st = path.stat()
    with open(path, "r+b") as f:  # break the magic but keep size and mtime (the stamp still matches)
        f.write(b"XXXX")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    llm = slmkit.load("builtin", dtype="float32")
    assert llm.engine.model_type.startswith("gemma3")
    assert path.read_bytes()[:4] == b"GGUF"


def test_unusable_home_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "file"))
    with pytest.raises(ModelFileError, match="SLMKIT_HOME"):
        builtin_model_path()
