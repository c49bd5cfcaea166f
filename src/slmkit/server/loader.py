"""How `slm serve` loads one model: slmkit.load, then continuous batching over `slots` rows when the
model gives token ids (a cloud model has no batch of ours). A plain function of plain values, so a
Ray Serve replica (slmkit.serving.ray) builds the same loader on its own machine."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import MemoryPlanError, SlmkitError


def model_loader(name: str, path: str, *, dtype: str = "auto", quant: str | None = None,
                 group_size: int | None = None, slots: int = 4, slot_context: int | None = None,
                 where: str = "") -> Callable[[], Any]:
    """() -> the loaded LLM, a line on stderr saying how it runs (where: who loaded it, e.g. a replica)."""
    from ..api import load

    def load_it() -> Any:
        t0 = time.perf_counter()
        llm = load(path, dtype=dtype, quant=quant, group_size=group_size)
        note = ""
        if slots > 1 and llm.capabilities.token_ids:
            try:
                llm.enable_batching(slots, slot_context or min(llm.context_length, 4096))
                st = llm.stats()
                note = (f", {slots} slots x {st.request_context} tokens continuously batched "
                        f"(KV {st.kv_bytes / 2**30:.2f} GiB)")
            except MemoryPlanError:
                raise  # the asked-for plan does not fit: say so rather than serve something else
            except SlmkitError as e:
                note = f", one request at a time ({e})"
        sys.stderr.write(f"[{name}{where}: {llm.name} loaded in {time.perf_counter() - t0:.1f} s, "
                         f"context {llm.context_length} tokens{note}]\n")
        return llm
    return load_it
