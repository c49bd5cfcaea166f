"""The GGUF loader asks for transparent huge pages under the repacked codes (loading/memory.py
huge_pages): advice only, values untouched; where the system grants THP on request, the tensor's
memory is backed by huge pages once written."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from slmkit.loading.memory import huge_pages
from slmkit.quant.gguf_repack import repack


def _anon_huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages (kB) of the mappings of /proc/self/smaps that overlap [lo, hi)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            a, b = int(m.group(1), 16), int(m.group(2), 16)
            inside = a < hi and b > lo
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_huge_pages_is_advice_only_and_granted_where_thp_is_on_request():
    small = torch.arange(100, dtype=torch.uint8)
    huge_pages(small)  # smaller than a huge page: nothing to advise, no error
    big = torch.empty(64 << 20, dtype=torch.uint8)
    huge_pages(big)
    big.fill_(7)
    assert int(big[::4096].sum()) == 7 * (big.numel() // 4096)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.is_file() and re.search(r"\[(madvise|always)\]", mode.read_text()):
        start = big.data_ptr()
        assert _anon_huge_kb(start, start + big.numel()) >= 2048


def test_repack_hands_the_codes_tensor_to_advise():
    seen = []
    raw = torch.zeros(16 * 18, dtype=torch.uint8)  # one Q4_0 row of 512 inputs (16 blocks), all zero
    qw = repack(raw, 2, (1, 512), advise=lambda t: seen.append(t.data_ptr()))
    assert qw is not None and seen == [qw.qweight.data_ptr()]
