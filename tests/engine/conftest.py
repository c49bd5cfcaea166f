"""Fixtures shared by tests/engine's modules (a module's own fixture of the same name wins)."""
from __future__ import annotations

import pytest

import slmkit
from tests.helpers.tiny_models import make_phi3_folder


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny random Phi-3 (GQA) in float32, one per module (the batch-speculation tests decode with it)."""
    return slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("bspec"), "gqa"), dtype="float32")
