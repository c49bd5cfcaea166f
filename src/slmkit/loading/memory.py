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


def _cgroup_room(root: str) -> int | None:
    """Bytes left under this process's cgroup limit: v2 memory.max - memory.current, or v1
    memory.limit_in_bytes - memory.usage_in_bytes; None when unlimited or unreadable."""
    for limit_file, used_file in (("memory.max", "memory.current"),
                                  ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"{root}/{limit_file}") as f:
                limit = f.read().strip()
            with open(f"{root}/{used_file}") as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "unlimited" as ~2**63
            return None
        return max(0, int(limit) - used)
    return None


def available_bytes(cgroup_root: str = "/sys/fs/cgroup", meminfo: str = "/proc/meminfo") -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup (container) limit,
    v2 or v1; None where neither can be read."""
    found: list[int] = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        pass
    room = _cgroup_room(cgroup_root)
    if room is not None:
        found.append(room)
    if not found:
        try:
            import psutil

            found.append(int(psutil.virtual_memory().available))
        except ImportError:
            return None
    return min(found)


# bytes per weight of a linear layer at each precision (int8 / int4: the codes plus their per-32
# scales and minimums as slmkit.quant stores them); other tensors (embeddings, norms, a MoE
# router) stay in the float dtype
_LINEAR_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0625, "int4": 0.625}


def ram_by_precision(model: torch.nn.Module) -> dict[str, int]:
    """The memory a model's weights need at each precision (also for a model built on the meta
    device, before anything is read): the planner's numbers for a load, describe() and /api/show.
    int4 keeps lm_head at int8, as `load(quant="int4")` does."""
    linear, head, other = 0, 0, 0
    seen: set[int] = set()
    for name, m in model.named_modules():
        n, k = getattr(m, "out_features", None), getattr(m, "in_features", None)
        if isinstance(n, int) and isinstance(k, int):  # nn.Linear, QuantLinear, a packed linear
            if name == "lm_head":
                head += n * k
            else:
                linear += n * k
            seen.update(id(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t.dim() >= 2)
    other = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if id(t) not in seen)
    out = {}
    for prec, per in _LINEAR_BYTES.items():
        float_bytes = 4 if prec == "float32" else 2
        head_per = _LINEAR_BYTES["int8"] if prec == "int4" else per
        out[prec] = int(linear * per + head * head_per + other * float_bytes)
    return out
