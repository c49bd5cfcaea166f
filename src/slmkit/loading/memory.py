"""Keep peak memory at one copy of the weights when a memory-mapped checkpoint is copied
(packed, or converted to another dtype): drop our mapping of each source tensor's pages once
its copy exists. Linux only; elsewhere a no-op."""
from __future__ import annotations

import bisect
import ctypes
import mmap
import sys

import torch

MADV_DONTNEED = 4


class FileMappings:
    """Address ranges of this process's private file mappings (Linux /proc/self/maps)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 6 and parts[1].endswith("p") and parts[4] != "0" and parts[5].startswith("/"):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.starts.append(lo)
                        self.ends.append(hi)
        except OSError:
            pass
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        self.starts = [self.starts[i] for i in order]
        self.ends = [self.ends[i] for i in order]

    def contains(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self.starts, lo) - 1
        return i >= 0 and hi <= self.ends[i]


def release_pages(t: torch.Tensor, maps: FileMappings) -> None:
    """Drop our page-table entries for a memory-mapped checkpoint tensor that was just copied.

    Only for private *file* mappings, whose clean pages re-read from the file if touched again,
    so this never loses data; it keeps peak RSS at one copy of the weights instead of two.
    """
    if sys.platform != "linux":
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = (start + page - 1) // page * page, end // page * page
    if hi > lo and maps.contains(start, end):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup (container) limit;
    None where neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            import psutil

            found.append(int(psutil.virtual_memory().available))
        except ImportError:
            return None
    return min(found)
