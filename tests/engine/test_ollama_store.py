"""Ollama store lookup: names, manifests and digests resolve inside the store, never outside it."""
from __future__ import annotations

import hashlib
import json

import pytest

from slmkit.errors import InvalidRequestError, ModelFileError
from slmkit.sources.ollama import parse_name, resolve_ollama

MEDIA = "application/vnd.ollama.image.model"


def make_store(root, name="phi3.5", tag="latest", blob=b"GGUF-blob", digest=None, layers=None):
    hexd = hashlib.sha256(blob).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{hexd}").write_bytes(blob)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = layers if layers is not None else [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
        {"mediaType": MEDIA, "digest": digest or f"sha256:{hexd}", "size": len(blob)}]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return root / "blobs" / f"sha256-{hexd}"


def test_resolves_blob_with_default_tag_and_env(tmp_path, monkeypatch):
    blob = make_store(tmp_path)
    assert resolve_ollama("phi3.5", tmp_path) == blob.resolve()
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert resolve_ollama("phi3.5:latest") == blob.resolve()


def test_names():
    assert parse_name("phi3.5") == ("registry.ollama.ai", "library", "phi3.5", "latest")
    assert parse_name("me/mine:q4") == ("registry.ollama.ai", "me", "mine", "q4")
    for bad in ("../etc", "a/../../b", "phi3:../../x", "x/y/z/w", "", "a:b:c/..", "ph i3"):
        with pytest.raises(InvalidRequestError):
            parse_name(bad)


@pytest.mark.parametrize("digest", ["sha256:../../../etc/passwd", "sha256:" + "g" * 64, "md5:abc", "/etc/passwd"])
def test_bad_digest_rejected(tmp_path, digest):
    make_store(tmp_path, digest=digest)
    with pytest.raises(ModelFileError, match="digest"):
        resolve_ollama("phi3.5", tmp_path)


def test_missing_model_manifest_and_blob(tmp_path):
    with pytest.raises(ModelFileError, match="not in the store"):
        resolve_ollama("nothere", tmp_path)
    blob = make_store(tmp_path)
    blob.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        resolve_ollama("phi3.5", tmp_path)


def test_manifest_without_model_layer(tmp_path):
    make_store(tmp_path, layers=[])
    with pytest.raises(ModelFileError, match="exactly one layer"):
        resolve_ollama("phi3.5", tmp_path)


def test_symlinked_manifest_dir_cannot_escape(tmp_path):
    outside = tmp_path / "outside"
    store = tmp_path / "store"
    make_store(outside)
    (store / "manifests" / "registry.ollama.ai").mkdir(parents=True)
    (store / "manifests" / "registry.ollama.ai" / "library").symlink_to(
        outside / "manifests" / "registry.ollama.ai" / "library")
    with pytest.raises(ModelFileError, match="outside"):
        resolve_ollama("phi3.5", store)


def test_uppercase_digest_host_port_and_case_insensitive_names(tmp_path):
    blob = make_store(tmp_path, name="Phi3")
    hexd = blob.name.removeprefix("sha256-")
    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "Phi3" / "latest"
    manifest.write_text(json.dumps({"layers": [{"mediaType": MEDIA, "digest": f"sha256:{hexd.upper()}"}]}))
    assert resolve_ollama("phi3", tmp_path) == blob.resolve()
    assert parse_name("localhost:5000/ns/model:v1") == ("localhost:5000", "ns", "model", "v1")


def test_hostile_manifests(tmp_path):
    make_store(tmp_path)
    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "phi3.5" / "latest"
    manifest.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ModelFileError, match="manifest"):
        resolve_ollama("phi3.5", tmp_path)
    manifest.write_text(" " * (2 << 20))
    with pytest.raises(ModelFileError, match="larger"):
        resolve_ollama("phi3.5", tmp_path)


def test_store_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelFileError, match="not a directory"):
        resolve_ollama("phi3.5", tmp_path / "f")
