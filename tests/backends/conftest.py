"""Tiny Phi-3 folders converted by each runtime's own tool, once per test session."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.tiny_models import make_phi3_folder


@pytest.fixture(scope="session")
def phi3_hf(tmp_path_factory):
    """A tiny Phi-3 (gqa) that the converters accept as it is. original_max_position_embeddings =
    max_position_embeddings: otherwise ORT GenAI's builder takes it for a LongRoPE model (and fails
    on its missing factors). The builder also takes any Linear as wide as the vocabulary for the
    output head, so no other layer may be that wide (checked here)."""
    folder = make_phi3_folder(tmp_path_factory.mktemp("phi3-hf"), "gqa", original_max_position_embeddings=256)
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    widths = {cfg["hidden_size"], 2 * cfg["intermediate_size"], cfg["intermediate_size"],
              (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim}
    assert cfg["vocab_size"] not in widths
    return folder


@pytest.fixture(scope="session")
def phi3_ort(phi3_hf, tmp_path_factory):
    """phi3_hf converted by ORT GenAI's model builder at fp32 for the CPU."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")  # the builder's own dependency
    out, cache = tmp_path_factory.mktemp("phi3-ort"), tmp_path_factory.mktemp("ort-cache")
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(phi3_hf), "-o", str(out),
                          "-p", "fp32", "-e", "cpu", "-c", str(cache)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def phi3_ov_cache(tmp_path_factory):
    """Where openvino: exports phi3_hf (once per session: a second load finds the export there)."""
    pytest.importorskip("openvino")
    return tmp_path_factory.mktemp("ov-cache")
