"""openvino:./folder: a Hugging Face folder exported on load (OpenVINO's converter + make-stateful,
cached) and an already-exported folder both run through runtime.py's loop: greedy tokens and
logits equal to the native engine at fp32, every GenerationOption through our processors."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

import slmkit
from slmkit.backends.openvino import XML
from slmkit.errors import ModelFileError, UnsupportedByBackendError, UnsupportedModelError

pytest.importorskip("openvino")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def export_log():
    return Lines()


@pytest.fixture(scope="module")
def pair(phi3_hf, phi3_ov_cache, export_log):
    logger = logging.getLogger("slmkit.backends.openvino")
    logger.addHandler(export_log)
    try:  # the first load exports phi3_hf into phi3_ov_cache
        ov = slmkit.load(f"openvino:{phi3_hf}", cache_dir=str(phi3_ov_cache))
    finally:
        logger.removeHandler(export_log)
    return slmkit.load(phi3_hf, dtype="float32"), ov


def test_greedy_and_logits_match_native(pair):
    native, ov = pair
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert ov.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    torch.testing.assert_close(ov.logits(prompt), native.logits(prompt), atol=1e-4, rtol=1e-4)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    assert ov.chat(msgs, max_new_tokens=12, temperature=0).text == native.chat(msgs, max_new_tokens=12,
                                                                               temperature=0).text


def test_options_run_through_our_processors(pair):
    native, ov = pair
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, repetition_penalty=1.3, logprobs=True,
              top_logprobs=2)
    a, b = native.generate("Once upon", **kw), ov.generate("Once upon", **kw)
    assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
    d = ov.describe()
    assert (d.format, d.dtype, ov.capabilities.backend) == ("openvino", "float32", "openvino")
    with pytest.raises(UnsupportedByBackendError, match="num_beams"):
        ov.generate("x", num_beams=2)


def test_export_is_cached_and_logged(pair, phi3_hf, phi3_ov_cache, export_log, caplog):
    native, ov = pair
    (export,) = [p for p in phi3_ov_cache.iterdir() if (p / XML).is_file()]
    (line,) = export_log.lines  # the export said in one line naming the folder and where it went
    assert str(phi3_hf) in line and str(export) in line
    with caplog.at_level(logging.WARNING, logger="slmkit.backends.openvino"):
        again = slmkit.load(f"openvino:{phi3_hf}", cache_dir=str(phi3_ov_cache))  # the cached export
        direct = slmkit.load(f"openvino:{export}")  # an exported folder runs as it is
    assert not caplog.records
    prompt = [3, 1, 4, 1, 5]
    want = native.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert again.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == want
    assert direct.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == want


def test_refusals(phi3_hf, phi3_ov_cache, tmp_path):
    with pytest.raises(UnsupportedByBackendError, match="device.*openvino"):
        slmkit.load(f"openvino:{phi3_hf}", device="cuda", cache_dir=str(phi3_ov_cache))
    with pytest.raises(UnsupportedByBackendError, match="quant"):
        slmkit.load(f"openvino:{phi3_hf}", quant="int4", cache_dir=str(phi3_ov_cache))
    with pytest.raises(ModelFileError, match="neither an OpenVINO export"):
        slmkit.load(f"openvino:{tmp_path}")
    (export,) = [p for p in phi3_ov_cache.iterdir() if (p / XML).is_file()]
    broken = shutil.copytree(export, tmp_path / "broken")
    (broken / XML).write_text("<not a model")
    with pytest.raises(ModelFileError, match="OpenVINO cannot"):
        slmkit.load(f"openvino:{broken}")


def test_sliding_window_exports_and_longrope_is_refused(phi3_folders, tmp_path):
    """A sliding-window Phi-3 (window 8) keeps its whole past as state and the window in the mask:
    greedy 32 tokens past the window equal native. LongRoPE's short/long switch would be frozen by
    tracing: refused, naming the way out."""
    sliding = phi3_folders("mha_sliding")
    native = slmkit.load(sliding, dtype="float32")
    ov = slmkit.load(f"openvino:{sliding}", cache_dir=str(tmp_path))
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert ov.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    with pytest.raises(UnsupportedModelError, match="LongRoPE.*optimum-cli"):
        slmkit.load(f"openvino:{phi3_folders('longrope')}", cache_dir=str(tmp_path))
