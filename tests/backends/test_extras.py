"""A runtime whose optional package is missing: one BackendUnavailableError line naming the pip extra
(simulated by making its import fail), from slmkit.load and from `slm run`."""
from __future__ import annotations

import sys

import pytest

import slmkit
from slmkit.cli import main
from slmkit.errors import BackendUnavailableError

# provider -> (the module its open() imports, the extra that brings it, a target)
CASES = {"llamacpp": ("llama_cpp", "llamacpp", "./x.gguf"),
         "transformers": ("transformers", "transformers", "./folder"),
         "ollama+http": ("ollama", "ollama", "//127.0.0.1:9/phi3.5")}


@pytest.mark.parametrize("provider", sorted(CASES))
def test_missing_extra_names_it(provider, monkeypatch):
    module, extra, target = CASES[provider]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(BackendUnavailableError) as e:
        slmkit.load(f"{provider}:{target}")
    assert e.value.extra == extra and e.value.backend == provider
    assert f"pip install 'slmkit[{extra}]'" in str(e.value) and "\n" not in str(e.value)


def test_cli_says_it_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["run", "llamacpp:./x.gguf", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slmkit[llamacpp]" in err and err.startswith("error: ")


def test_extras_are_declared():
    from pathlib import Path

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for _, extra, _ in CASES.values():
        assert extra in extras, extra
    assert any(d.startswith("llama-cpp-python") for d in extras["llamacpp"])
    assert not any(d.startswith("torchvision") for d in extras["transformers"])
