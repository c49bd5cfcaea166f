"""`slm quantize` / slmkit.api.quantize: a model's float linears quantized and written as a folder."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import LLM


def quantize(src: str | Path, dst: str | Path, *, quant: str, group_size: int | None = None) -> tuple[Path, LLM]:
    """Load src with its float linear weights quantized (quant "int8" / "int4") and write them as a
    safetensors folder dst (quant/store.py's format, loadable by load()). Returns (dst, the LLM)."""
    from .api import load
    from .backends.native import NativeBackend
    from .quant.store import save_quantized

    llm = load(src, quant=quant, group_size=group_size, pack=False)
    assert isinstance(llm.backend, NativeBackend)  # load() makes native backends only
    engine = llm.engine
    out = save_quantized(engine.model, engine.config, dst, quant=quant, group_size=group_size,
                         source=llm.backend.path, tokenizer=engine.tokenizer,
                         generation_config=engine.generation_config)
    return out, llm
