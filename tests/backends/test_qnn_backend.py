"""qnn:./folder: ONNX Runtime's QNN execution provider under the ORT GenAI loop. Where neither the
onnxruntime-qnn plugin nor a QNN build of onnxruntime is installed (the project's venv: the
package is not a dependency of the test extra) the error names what to install and this platform;
with the plugin importable (its Linux x86_64 wheel carries the HTP backend) the builder's folder
runs through it and gives the native engine's greedy tokens."""
from __future__ import annotations

import platform

import pytest

import slmkit
from slmkit.backends import qnn
from slmkit.errors import BackendUnavailableError, InvalidRequestError

pytest.importorskip("onnxruntime_genai")


def test_unavailable_names_package_and_platform(monkeypatch, phi3_ort):
    monkeypatch.setattr(qnn, "plugin", lambda: None)  # as on a machine without onnxruntime-qnn
    monkeypatch.setattr(qnn, "bundled", lambda: False)
    with pytest.raises(BackendUnavailableError) as e:
        slmkit.load(f"qnn:{phi3_ort}")
    msg = str(e.value)
    assert "onnxruntime-qnn" in msg and platform.machine() in msg and "slmkit[qnn]" in msg
    assert e.value.backend == "qnn" and e.value.extra == "qnn"


@pytest.mark.skipif(qnn.plugin() is not None or qnn.bundled(), reason="onnxruntime-qnn is installed here")
def test_unavailable_here_without_simulation(phi3_ort):
    with pytest.raises(BackendUnavailableError, match="onnxruntime-qnn"):
        slmkit.load(f"qnn:{phi3_ort}")


def test_bundled_provider_path_reaches_ort_genai(monkeypatch, phi3_ort):
    """The provider-bridge path (a QNN build of onnxruntime) asks ORT GenAI for "qnn"; this build of
    ORT GenAI has no QNN, and its refusal comes back as BackendUnavailableError, not a model error."""
    monkeypatch.setattr(qnn, "plugin", lambda: None)
    monkeypatch.setattr(qnn, "bundled", lambda: True)
    with pytest.raises(BackendUnavailableError, match="(?i)qnn execution provider"):
        slmkit.load(f"qnn:{phi3_ort}")


def test_plugin_runs_the_folder(phi3_hf, phi3_ort):
    if qnn.plugin() is None:
        pytest.skip("the onnxruntime-qnn plugin is not installed")
    native, q = slmkit.load(phi3_hf, dtype="float32"), slmkit.load(f"qnn:{phi3_ort}")
    prompt = [1, 5, 9, 20, 33]
    want = native.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert q.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == want
    assert q.capabilities.backend == "qnn"
    with pytest.raises(InvalidRequestError, match="qnn_backend"):
        slmkit.load(f"qnn:{phi3_ort}", qnn_backend="dsp")
