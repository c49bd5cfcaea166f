"""The golden test: greedy decoding of 32 tokens from one tiny Phi-3 gives the same tokens on every
runtime slmkit ships, each on its own float32 form of the same weights: the native engine (the HF
folder), transformers (the folder), llama.cpp (an F32 GGUF written from it), ONNX Runtime GenAI
(its model builder's fp32 CPU export), OpenVINO (the folder, which its backend exports) and MLX
(mlx-lm on the folder). Our tokenizer, template and sampler run over each runtime's logits
(backends/runtime.py), so any difference is the runtime's arithmetic."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import slmkit
from slmkit.errors import BackendUnavailableError
from tests.helpers.gguf_models import hf_to_gguf
from tests.helpers.tiny_models import make_phi3_folder

PROMPT = [1, 5, 9, 20, 33]
MESSAGES = [{"role": "user", "content": "Tell me a story about the sea"}]
N = 32


def _native(folder: Path, work: Path) -> str:
    return str(folder)


def _transformers(folder: Path, work: Path) -> str:
    return f"transformers:{folder}"


def _llamacpp(folder: Path, work: Path) -> str:
    return f"llamacpp:{hf_to_gguf(folder, work / 'golden-f32.gguf', 'F32')}"


def _onnx(folder: Path, work: Path) -> str:
    out = work / "ort-fp32"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(work / "ort-cache")], check=True, capture_output=True,
                   timeout=600)
    return f"onnx:{out}"


def _openvino(folder: Path, work: Path) -> str:
    # the backend exports an HF folder itself (optimum-intel 1.15 cannot: it imports openvino.runtime,
    # which OpenVINO 2026 no longer has)
    return f"openvino:{folder}"


def _mlx(folder: Path, work: Path) -> str:
    return f"mlx:{folder}"


# runtime -> (the slmkit.backends module that runs it, None for the native engine; its model form)
RUNTIMES = {"native": (None, _native), "transformers": ("transformers_backend", _transformers),
            "llamacpp": ("llamacpp", _llamacpp), "onnx": ("onnx", _onnx), "openvino": ("openvino", _openvino),
            "mlx": ("mlx", _mlx)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny GQA Phi-3 with max_position_embeddings == original_max (4096): ORT GenAI's builder
    takes any other Phi-3 for a LongRoPE one (and fails on a config without its factors)."""
    return make_phi3_folder(tmp_path_factory.mktemp("golden"), "gqa", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def golden(folder):
    """The native engine's greedy answers: the tokens every runtime must give."""
    native = slmkit.load(folder, dtype="float32")
    ids = native.generate(PROMPT, max_new_tokens=N, temperature=0, ignore_eos=True).token_ids
    chat = native.chat(MESSAGES, max_new_tokens=N, temperature=0, ignore_eos=True).token_ids
    assert len(ids) == N and len(set(ids)) > 4, "a degenerate model would make every runtime agree trivially"
    return ids, chat


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_greedy_32_tokens_identical(runtime, golden, folder, tmp_path):
    module, build = RUNTIMES[runtime]
    if module is not None and importlib.util.find_spec(f"slmkit.backends.{module}") is None:
        pytest.skip(f"slmkit.backends.{module} is not in this build yet")
    try:
        llm = slmkit.load(build(folder, tmp_path), dtype="float32")
    except BackendUnavailableError as e:  # the runtime's extra is not installed here (e.g. mlx in CI)
        pytest.skip(str(e))
    ids, chat = golden
    assert llm.generate(PROMPT, max_new_tokens=N, temperature=0, ignore_eos=True).token_ids == ids
    assert llm.chat(MESSAGES, max_new_tokens=N, temperature=0, ignore_eos=True).token_ids == chat
