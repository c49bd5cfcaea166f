"""A cache of a GGUF file's load-time work: the repacked quantized weights, the tensors converted
to the run's dtype, and the tokenizer built from the metadata.

The first load of a GGUF file repacks every quantized tensor into the kernel's layout and builds
a tokenizer from the metadata; a repeated load of the same file memory-maps the cache instead
(``torch.load(mmap=True)``: nothing is copied, pages come in as the model touches them).

The tokenizer is a file of its own beside the weights (``.tokenizer``, a pickle of plain lists,
strings and dicts, read by an unpickler that refuses every class): a BPE model as its tokens in id
order and its merges, which `tokenizers.models.BPE` takes directly, plus the rest of the
tokenizer's JSON and its added tokens. Parsing the whole tokenizer JSON instead (`from_str`) took
0.9-1.0 s of the built-in model's 1.3 s repeated load (262k tokens, 515k merges); this ~0.65 s.
The rebuilt tokenizer serializes to the very JSON it came from (tested).

Never served stale: the cache records a fingerprint of its source - the file's size and mtime,
a hash of its header (metadata and tensor infos) and of blocks sampled evenly through the tensor
data - and a load whose fingerprint differs rebuilds and replaces it. A cache that cannot be read
(truncated, corrupt, another format) is rebuilt too; one that cannot be written only costs the
speed-up. Writes are atomic (a temporary sibling renamed into place) and done on a thread of their
own (write_soon): a first load does not wait for them, the process does before it exits.

Where: ``$SLMKIT_GGUF_CACHE`` (a folder; ``0`` / ``off`` turns the cache off, ``1`` / ``on`` keeps it in
its usual place), else
``<slmkit home>/gguf`` (``$SLMKIT_HOME``, ``$XDG_CACHE_HOME/slmkit`` or ``~/.cache/slmkit``).
One cache file per source path and load mode, replaced when its source changes.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..envflags import is_off, is_on
from ..quant.format import QuantWeight

# 6: K-quants' super-scales in float16; 5: two-level scales and mins paired; 4: the tokenizer in a file of
# its own; 3: Q5_*, Q6_K at 5, 6 bits
FORMAT = 6
SAMPLES = 64          # blocks of tensor data hashed into the fingerprint
SAMPLE_BYTES = 4096
_PARTS = ("qweight", "scales", "mins", "super_scales", "super_mins")


def cache_dir() -> Path | None:
    """The cache folder, or None when the cache is off."""
    env = os.environ.get("SLMKIT_GGUF_CACHE")
    if env is not None and (is_off(env) or not env.strip()):
        return None
    if env and not is_on(env):  # a switch turned on is not a folder named "1"
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


def cache_path(path: str | Path, mode: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    key = hashlib.blake2b(f"{os.path.realpath(path)}\0{mode}".encode(), digest_size=16).hexdigest()
    return root / f"{Path(path).stem[:60]}-{key}.pt"


def tokenizer_path(path: str | Path, mode: str) -> Path | None:
    where = cache_path(path, mode)
    return None if where is None else where.with_suffix(".tokenizer")


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
                        [(str(a), str(b)) for a, b in obj["views"]])
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
           "views": [list(v) for v in work.views]}
    return where if _replace(where, lambda fh: torch.save(obj, fh)) else None


def _replace(where: Path, dump: Any) -> bool:
    """Write `where` through dump(binary file) into a temporary sibling renamed into place."""
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{where.name}.", dir=where.parent)
        with os.fdopen(fd, "wb") as fh:
            dump(fh)
        os.replace(tmp, where)
        return True
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


# Writes under way on threads of their own (write_soon), by cache file.
_pending: dict[Path, threading.Thread] = {}
_pending_lock = threading.Lock()


def write_soon(path: str | Path, mode: str, fp: str, work: LoadWork | None, tokenizer: Any) -> None:
    """write_tokenizer() and write() (unless work is None: the tokenizer alone) on a thread of its
    own, so that a first load returns as soon as its model runs instead of after writing a copy of
    its weights (about as long as the repack itself). Not a daemon: the process finishes the write
    before it exits. A later read() or read_tokenizer() of the same entry, and wait(), join it first."""
    where = cache_path(path, mode)
    if where is None:
        return

    def run() -> None:
        try:
            if work is not None:  # first: mostly file I/O, off the GIL, while the load finishes
                write(path, mode, fp, work)
            write_tokenizer(path, mode, fp, tokenizer)  # then the tokenizer's state, Python-heavy
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


_FLAGS = ("bos_token", "eos_token", "add_bos", "add_eos", "chat_template")
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def tokenizer_state(tok: Any) -> dict[str, Any]:
    """A Tokenizer as plain data. One built from GGUF metadata kept its BPE model's inputs
    (bpe_parts): those (its tokens in id order and its merges, sharing the token strings), the rest
    of its JSON without the model, its added tokens in id order, and the wrapper's flags; the model's
    JSON is never written out and parsed back (~1.6 s of the GIL for the built-in model, on the
    thread that writes the cache beside the first answer). Any other as its whole JSON."""
    import tokenizers
    from tokenizers import models

    state: dict[str, Any] = {k: getattr(tok, k) for k in _FLAGS}
    tk = tok.backend
    if tok.bpe_parts is None:
        return {**state, "json": tk.to_str()}
    tokens, merges, options = tok.bpe_parts
    shell = tokenizers.Tokenizer(models.BPE())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(tk, part) is not None:
            setattr(shell, part, getattr(tk, part))
    added = [{"id": i, "content": a.content, **{k: getattr(a, k) for k in _ADDED_FLAGS}}
             for i, a in sorted(tk.get_added_tokens_decoder().items())]
    return {**state, "tokens": tokens, "merges": merges, "bpe": options, "shell": shell.to_str(), "added": added}


def tokenizer_from_state(state: dict[str, Any]) -> Any:
    """The Tokenizer tokenizer_state() recorded."""
    import tokenizers
    from tokenizers import AddedToken, models

    from ..text.tokenizer import Tokenizer

    flags = {k: state[k] for k in _FLAGS}
    if "json" in state:
        return Tokenizer.from_tokenizer(tokenizers.Tokenizer.from_str(state["json"]), **flags)
    tokens = state["tokens"]
    tk = tokenizers.Tokenizer(models.BPE(dict(zip(tokens, range(len(tokens)))), state["merges"], **state["bpe"]))
    shell = tokenizers.Tokenizer.from_str(state["shell"])
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(shell, part) is not None:
            setattr(tk, part, getattr(shell, part))
    added, run = state["added"], 0
    while run < len(added):  # runs of like specialness in id order: ids are given out as they come
        end = run
        while end < len(added) and added[end]["special"] == added[run]["special"]:
            end += 1
        batch = [AddedToken(a["content"], **{k: a[k] for k in _ADDED_FLAGS}) for a in added[run:end]]
        (tk.add_special_tokens if added[run]["special"] else tk.add_tokens)(batch)
        run = end
    got = tk.get_added_tokens_decoder()
    if any(got.get(a["id"]) is None or str(got[a["id"]]) != a["content"] for a in added):
        raise ValueError("the added tokens did not get their ids back")
    return Tokenizer.from_tokenizer(tk, **flags)


class _PlainUnpickler(pickle.Unpickler):
    """Lists, tuples, dicts, strings and numbers only: no class is ever looked up."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tokenizer cache")


def write_tokenizer(path: str | Path, mode: str, fp: str, tokenizer: Any) -> Path | None:
    """Store tokenizer_state(tokenizer), built from (path, mode)'s file of fingerprint fp, atomically."""
    where = tokenizer_path(path, mode)
    if where is None:
        return None
    obj = {"format": FORMAT, "fingerprint": fp, "state": tokenizer_state(tokenizer)}
    return where if _replace(where, lambda fh: pickle.dump(obj, fh, protocol=5)) else None


def read_tokenizer(path: str | Path, mode: str, fp: str) -> Any:
    """The cached tokenizer of (path, mode) if it was built from a file of fingerprint fp, else None
    (absent, stale, damaged, of another format)."""
    where = tokenizer_path(path, mode)
    if where is None:
        return None
    wait(cache_path(path, mode))  # this process's own write of it, if one is under way
    try:
        obj = _PlainUnpickler(io.BytesIO(where.read_bytes())).load()
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("fingerprint") != fp:
            return None
        return tokenizer_from_state(obj["state"])
    except Exception:  # noqa: BLE001 -- absent or damaged: built from the file again
        return None
