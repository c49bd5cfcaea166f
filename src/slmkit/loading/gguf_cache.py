"""A cache of a GGUF file's load-time work: the repacked quantized weights, the tensors converted
to the run's dtype, and the tokenizer built from the metadata.

The first load of a GGUF file repacks every quantized tensor into the kernel's layout and builds
a tokenizer from the metadata; a repeated load of the same file memory-maps the cache instead
(``torch.load(mmap=True)``: nothing is copied, pages come in as the model touches them).

Never served stale: the cache records a fingerprint of its source - the file's size and mtime,
a hash of its header (metadata and tensor infos) and of blocks sampled evenly through the tensor
data - and a load whose fingerprint differs rebuilds and replaces it. A cache that cannot be read
(truncated, corrupt, another format) is rebuilt too; one that cannot be written only costs the
speed-up. Writes are atomic (a temporary sibling renamed into place) and done on a thread of their
own (write_soon): a first load does not wait for them, the process does before it exits.

Where: ``$SLMKIT_GGUF_CACHE`` (a folder; ``0`` / ``off`` turns the cache off), else
``<slmkit home>/gguf`` (``$SLMKIT_HOME``, ``$XDG_CACHE_HOME/slmkit`` or ``~/.cache/slmkit``).
One cache file per source path and load mode, replaced when its source changes.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..quant.format import QuantWeight

FORMAT = 3  # 3: Q5_*, Q6_K codes at 5 and 6 bits (2 held them as bytes); 2: the tokenizer state as it is
SAMPLES = 64          # blocks of tensor data hashed into the fingerprint
SAMPLE_BYTES = 4096
_PARTS = ("qweight", "scales", "mins", "super_scales", "super_mins")


def cache_dir() -> Path | None:
    """The cache folder, or None when the cache is off."""
    env = os.environ.get("SLMKIT_GGUF_CACHE")
    if env is not None and env.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if env:
        return Path(env).expanduser()
    from ..sources.store import home

    return home() / "gguf"


def fingerprint(path: str | Path, data_offset: int) -> str:
    """A hash of the file's size, mtime, header bytes and SAMPLES blocks spread over its data."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(min(data_offset, st.st_size)))
        span = max(0, st.st_size - data_offset - SAMPLE_BYTES)
        for i in range(SAMPLES):
            fh.seek(data_offset + span * i // (SAMPLES - 1))
            h.update(fh.read(SAMPLE_BYTES))
        fh.seek(max(0, st.st_size - SAMPLE_BYTES))
        h.update(fh.read())  # the last block, whatever SAMPLES' spacing
    return h.hexdigest()


@dataclass
class LoadWork:
    """What the load loop makes from a GGUF file (what the cache keeps)."""
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # converted copies only
    quantized: dict[str, QuantWeight] = field(default_factory=dict)
    requant: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    views: list[tuple[str, str]] = field(default_factory=list)  # (target, file name): mapped, not copied
    tokenizer: dict[str, Any] | None = None  # tokenizer_state()'s dict


def cache_path(path: str | Path, mode: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    key = hashlib.blake2b(f"{os.path.realpath(path)}\0{mode}".encode(), digest_size=16).hexdigest()
    return root / f"{Path(path).stem[:60]}-{key}.pt"


def read(path: str | Path, mode: str, fp: str) -> LoadWork | None:
    """The cached work for (path, mode) if its fingerprint is fp, else None (absent, stale, unreadable)."""
    where = cache_path(path, mode)
    if where is None:
        return None
    wait(where)  # this process's own write of it, if one is under way
    if not where.is_file():
        return None
    try:
        obj = torch.load(where, mmap=True, weights_only=True, map_location="cpu")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("fingerprint") != fp:
            return None
        work = LoadWork(dict(obj["weights"]), {}, dict(obj["requant"]), dict(obj["names"]),
                        [(str(a), str(b)) for a, b in obj["views"]],
                        obj.get("tokenizer"))
        for name, m in obj["quantized"].items():
            t = {p: m.get(p) for p in _PARTS}
            work.quantized[name] = QuantWeight(int(m["bits"]), int(m["n"]), int(m["k"]), int(m["group"]),
                                               int(m["zero"]), t["qweight"], t["scales"], t["mins"],
                                               t["super_scales"], t["super_mins"])
        return work
    except Exception:  # noqa: BLE001 -- a damaged cache is rebuilt, never an error
        return None


def write(path: str | Path, mode: str, fp: str, work: LoadWork) -> Path | None:
    """Store work for (path, mode) with fingerprint fp, atomically; None if the cache is off or unwritable."""
    where = cache_path(path, mode)
    if where is None:
        return None
    quantized = {}
    for name, q in work.quantized.items():
        m: dict[str, Any] = {"bits": q.bits, "n": q.n, "k": q.k, "group": q.group, "zero": q.zero}
        m.update({p: getattr(q, p) for p in _PARTS if getattr(q, p) is not None})
        quantized[name] = m
    obj = {"format": FORMAT, "fingerprint": fp, "weights": {k: v.contiguous() for k, v in work.weights.items()},
           "quantized": quantized, "requant": work.requant, "names": work.names,
           "views": [list(v) for v in work.views],
           "tokenizer": work.tokenizer}
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{where.name}.", dir=where.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, where)
        return where
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None


# Writes under way on threads of their own (write_soon), by cache file.
_pending: dict[Path, threading.Thread] = {}
_pending_lock = threading.Lock()


def write_soon(path: str | Path, mode: str, fp: str, work: LoadWork, tokenizer: Any) -> None:
    """write() (with tokenizer_state(tokenizer)) on a thread of its own, so that a first load returns
    as soon as its model runs instead of after writing a copy of its weights (about as long as the
    repack itself). Not a daemon: the process finishes the write before it exits. A later read() of
    the same entry, and wait(), join it first."""
    where = cache_path(path, mode)
    if where is None:
        return

    def run() -> None:
        try:
            write(path, mode, fp, replace(work, tokenizer=tokenizer_state(tokenizer)))
        except Exception:  # noqa: BLE001 -- an unwritable cache only costs the speed-up
            pass
        finally:
            with _pending_lock:
                if _pending.get(where) is thread:
                    del _pending[where]

    wait(where)  # one writer per entry at a time
    thread = threading.Thread(target=run, name="slmkit-gguf-cache", daemon=False)
    with _pending_lock:
        _pending[where] = thread
    thread.start()


def wait(where: Path | None = None) -> None:
    """Join the cache writes under way (all of them, or that of the cache file `where`)."""
    with _pending_lock:
        threads = list(_pending.values()) if where is None else [t for w, t in _pending.items() if w == where]
    for t in threads:
        t.join()


def tokenizer_state(tok: Any) -> dict[str, Any]:
    """A Tokenizer built from GGUF metadata as plain data (tokenizer.json text and its flags)."""
    return {"json": tok.backend.to_str(), "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "add_bos": tok.add_bos, "add_eos": tok.add_eos, "chat_template": tok.chat_template}


def tokenizer_from_state(state: dict[str, Any]) -> Any:
    """The Tokenizer tokenizer_state() recorded."""
    import tokenizers

    from ..text.tokenizer import Tokenizer

    return Tokenizer.from_tokenizer(tokenizers.Tokenizer.from_str(state["json"]), bos_token=state["bos_token"],
                                    eos_token=state["eos_token"], add_bos=state["add_bos"],
                                    add_eos=state["add_eos"], chat_template=state["chat_template"])
