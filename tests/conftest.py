"""Shared fixtures: tiny random-weight model folders, built once per test session."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import PHI3_VARIANTS, make_phi3_folder

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _gguf_cache_in_tmp(tmp_path_factory):
    """GGUF loads cache their repacked weights (loading/gguf_cache.py): keep the suite's caches out
    of the user's home, in one folder for the session (a test may point it elsewhere)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLMKIT_GGUF_CACHE", str(tmp_path_factory.mktemp("gguf-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def phi3_folders(tmp_path_factory):
    """{variant: folder} for every tiny Phi-3 configuration, built lazily."""
    built = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = make_phi3_folder(tmp_path_factory.mktemp(f"phi3-{variant}"), variant)
        return built[variant]

    return get


@pytest.fixture(params=sorted(PHI3_VARIANTS))
def phi3_variant(request):
    return request.param
