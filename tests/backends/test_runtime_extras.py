"""A missing optional extra (onnx, openvino, qnn) is one line naming the extra to install, from the
Python API and from `slm run`, whatever the model folder. The import failing is simulated by a None
in sys.modules (Python then refuses the import as if the package were absent)."""
from __future__ import annotations

import sys

import pytest

import slmkit
from slmkit.cli import main
from slmkit.errors import BackendUnavailableError


@pytest.mark.parametrize("provider, module, extra", [("onnx", "onnxruntime_genai", "onnx"),
                                                     ("qnn", "onnxruntime_genai", "qnn"),
                                                     ("openvino", "openvino", "openvino")])
def test_missing_extra_is_one_line(monkeypatch, tmp_path, capsys, provider, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(BackendUnavailableError) as e:
        slmkit.load(f"{provider}:{tmp_path}")
    assert e.value.extra == extra and e.value.backend == provider
    assert f"pip install 'slmkit[{extra}]'" in str(e.value) and "\n" not in str(e.value)
    assert main(["run", f"{provider}:{tmp_path}", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"slmkit[{extra}]" in err
