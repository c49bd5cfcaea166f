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


@pytest.fixture(scope="module", params=["default", "avx2"])
def kernel_variant(request):
    """Runs a kernel test module twice: with the kernel get_kernel() picks (SLMKIT_KERNEL as set), and
    with the AVX2 one forced (as SLMKIT_KERNEL=avx2 does; skipped where the CPU has no AVX2). Module
    scoped: a module's fixtures that load models (and pack their weights for one variant's kernel)
    take it as an argument, so they are built again for each."""
    from slmkit.kernels import qgemm

    saved = qgemm._lib, qgemm._tried, qgemm.variant
    if request.param == "avx2":
        if qgemm.get_kernel() is None and qgemm.build_error is None:
            pytest.skip("the compiled kernels are switched off (SLMKIT_KERNEL=0)")
        try:
            lib = qgemm.load_variant("avx2")
        except RuntimeError as e:
            pytest.skip(f"the AVX2 kernel cannot run here: {e}")
        qgemm._lib, qgemm._tried, qgemm.variant = lib, True, "avx2"
    yield request.param
    qgemm._lib, qgemm._tried, qgemm.variant = saved
