"""Every SLMKIT_* on/off switch reads the same words (envflags), whatever their case or spacing."""
from __future__ import annotations

import pytest

from slmkit.envflags import is_off, is_on
from slmkit.kernels import qgemm
from slmkit.loading import gguf_cache


@pytest.mark.parametrize("word", ["0", "off", "FALSE", " no ", "Off"])
def test_off_words_turn_the_kernel_and_the_gguf_cache_off(monkeypatch, word):
    assert is_off(word) and not is_on(word)
    monkeypatch.setenv("SLMKIT_KERNEL", word)
    assert qgemm.get_kernel() is None  # the PyTorch fallback
    monkeypatch.setenv("SLMKIT_GGUF_CACHE", word)
    assert gguf_cache.cache_dir() is None


@pytest.mark.parametrize("value", [None, "", "1", "avx2", "offline", "/tmp/no"])
def test_other_values_are_not_off(value):
    assert not is_off(value)


@pytest.mark.parametrize("value,packs", [(None, True), ("", True), ("0", True), ("off", True), (" No ", True),
                                         ("1", False), ("yes", False), ("true", False)])
def test_no_pack_switch_reads_the_same_words(monkeypatch, value, packs):
    """SLMKIT_NO_PACK: unset, empty or an off word leaves float linears to the kernels; anything else keeps them
    unpacked (both checks in loading/packing.py agree)."""
    from slmkit.loading import packing

    if value is None:
        monkeypatch.delenv("SLMKIT_NO_PACK", raising=False)
    else:
        monkeypatch.setenv("SLMKIT_NO_PACK", value)
    assert packing._no_pack() is not packs
    assert packing.kernel_linears_available() == (packs and qgemm.get_kernel() is not None)
