"""`slm pull`: a catalog model from the Hugging Face hub (through huggingface_hub, which resumes an
interrupted file; we check each LFS file's sha256 against the hub's), or `ollama:NAME[:TAG]` from an
Ollama-compatible registry (manifest, then blobs: resumed with a Range request, sha256-checked,
re-fetched once when corrupt). Both honour $SLMKIT_HOME; the hub honours $HF_ENDPOINT; the registry
is https://<host of the name> (registry.ollama.ai by default) unless $SLMKIT_OLLAMA_REGISTRY
gives a base URL. Offline, the first connection fails within CONNECT_TIMEOUT_S with a DownloadError.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..errors import DownloadError
from . import store
from .progress import Progress, human

CONNECT_TIMEOUT_S = 1.0
SAFETENSORS_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.py", "README.md", "LICENSE"]
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
Confirm = Callable[[str], bool]


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _reachable(url: str, what: str) -> None:
    """Fail fast when offline: one TCP connect with a short timeout, before any library retries."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise DownloadError(what, f"cannot reach {parts.scheme}://{parts.netloc} ({e.strerror or e}); "
                                  "offline? (set HF_ENDPOINT for a mirror)") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ Hugging Face hub
def _hub_files(repo: str, variant: Any, endpoint: str) -> tuple[str, list[tuple[str, int, str | None]]]:
    """(commit sha, [(file, size, lfs sha256)]) of the files this variant needs."""
    import fnmatch

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True, timeout=30)
    except HfHubHTTPError as e:
        raise DownloadError(repo, f"the hub refused: {' '.join(str(e).split())[:300]}") from None
    except OSError as e:
        raise DownloadError(repo, f"cannot reach the hub at {endpoint} ({e})") from None
    files = []
    for s in info.siblings or []:
        name = s.rfilename
        if variant.format == "gguf":
            keep = name == variant.file
        elif variant.format == "onnx":
            keep = name.startswith(variant.subfolder.rstrip("/") + "/")
        else:
            keep = "/" not in name and any(fnmatch.fnmatch(name, p) for p in SAFETENSORS_FILES)
        if keep:
            files.append((name, int(s.size or 0), s.lfs.sha256 if s.lfs else None))
    if not files:
        want = variant.file or variant.subfolder or "safetensors files"
        raise DownloadError(repo, f"the repo has no {want} (at {endpoint})")
    return str(info.sha), files


def _download_hub_files(repo: str, files: list[tuple[str, int, str | None]], revision: str, folder: Path,
                        endpoint: str, out: TextIO) -> None:
    """Each file from the hub's resolve URL into folder, resumable across runs (a `.partial` file and
    a Range request: huggingface_hub 2.x only resumes within one process), sha256-checked for LFS
    files, size-checked for the others; a corrupt file is fetched again once."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()  # the user's token, if any (httpx drops it on a redirect to the CDN)
    with httpx.Client(timeout=httpx.Timeout(60, connect=CONNECT_TIMEOUT_S * 5), headers=headers) as client:
        for name, size, sha in files:
            dest = folder / name
            if not dest.resolve().is_relative_to(folder.resolve()):
                raise DownloadError(f"{repo}/{name}", "a file name that leaves the model folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() and dest.stat().st_size == size and (sha is None or sha256_file(dest) == sha):
                continue
            url = hf_hub_url(repo, name, revision=revision, endpoint=endpoint)
            _fetch_verified(client, url, dest, sha, size, out, f"{repo}/{name}")


def pull_catalog(spec: str, *, confirm: Confirm | None = None, out: TextIO | None = None,
                 plan_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pull a catalog model (name[:tag]) into the store; returns its store entry. The memory plan runs
    first (MemoryPlanError when it cannot fit); confirm(message) may decline (returns the entry None)."""
    from . import memplan
    from .catalog import lookup

    out = out or sys.stderr
    entry, variant = lookup(spec)
    full = f"{entry.name}:{variant.tag}"
    memplan.check(memplan.plan(full, **(plan_kw or {})))
    if variant.format == "package":
        from .builtin import builtin_model_path

        path = builtin_model_path()
        return {"name": full, **store.register(full, path, source=f"package:{variant.package}", fmt="gguf",
                                               quant=variant.quant, imported=False)}
    assert variant.repo is not None
    endpoint = hf_endpoint()
    _reachable(endpoint, full)
    revision, files = _hub_files(variant.repo, variant, endpoint)
    total = sum(size for _, size, _ in files)
    msg = (f"pulling {full} ({entry.title}, {variant.quant}) from {variant.repo}: {human(total)} in "
           f"{len(files)} file(s)")
    if confirm is not None and not confirm(msg):
        raise DownloadError(full, "not pulled (declined)")
    out.write(msg + "\n")
    folder = store.folder_for(full)
    folder.mkdir(parents=True, exist_ok=True)
    _download_hub_files(variant.repo, files, revision, folder, endpoint, out)
    path = folder / variant.file if variant.format == "gguf" and variant.file else (
        folder / variant.subfolder if variant.format == "onnx" and variant.subfolder else folder)
    return {"name": full, **store.register(full, path, source=f"hf:{variant.repo}@{revision}", fmt=variant.format,
                                           quant=variant.quant, imported=False)}


# ------------------------------------------------------------------ Ollama registry
def _registry_base(host: str) -> str:
    return (os.environ.get("SLMKIT_OLLAMA_REGISTRY") or f"https://{host}").rstrip("/")


def _fetch(client: Any, url: str, dest: Path, sha: str | None, size: int, out: TextIO) -> None:
    """Download into dest.partial, resuming from its length; check the sha256 (or the size); rename
    into place. _Corrupt when the bytes do not match."""
    import httpx

    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.exists() else 0
    if size and have > size:
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    bar = Progress(f"  {dest.name[:40]}", size or None, done=have, out=out)
    try:
        with client.stream("GET", url, headers=headers, follow_redirects=True) as r:
            if r.status_code == 200 and have:  # the server ignored the range: start over
                have = 0
                bar.done = bar.start_done = 0
            elif r.status_code not in (200, 206):
                raise DownloadError(url, f"the server answered HTTP {r.status_code}")
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_bytes():  # as they arrive: a dropped connection keeps them
                    f.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as e:
        raise DownloadError(url, f"download interrupted ({type(e).__name__}); run the pull again to resume "
                                 f"({human(part.stat().st_size if part.exists() else 0)} kept)") from None
    bar.close()
    if (sha256_file(part) != sha) if sha else (size and part.stat().st_size != size):
        part.unlink()
        raise _Corrupt(dest.name)
    os.replace(part, dest)


def _fetch_verified(client: Any, url: str, dest: Path, sha: str | None, size: int, out: TextIO, what: str) -> None:
    """_fetch, and once more when the bytes do not match their digest; twice is a DownloadError."""
    for _attempt in (1, 2):
        try:
            _fetch(client, url, dest, sha, size, out)
            return
        except _Corrupt:
            out.write(f"  {dest.name}: sha256 mismatch, fetching it again\n")
    raise DownloadError(what, "sha256 does not match its digest, twice; not keeping it")


class _Corrupt(Exception):
    pass


def pull_ollama(name: str, *, out: TextIO | None = None) -> dict[str, Any]:
    """Pull NAME[:TAG] from an Ollama-compatible registry into the store's blobs/ and manifests/."""
    import httpx

    from .ollama import _DIGEST, MODEL_MEDIA_TYPE, parse_name

    out = out or sys.stderr
    host, ns, model, tag = parse_name(name)
    base = _registry_base(host)
    full = ollama_store_name(name)
    _reachable(base, full)
    root = store.home()
    with httpx.Client(timeout=httpx.Timeout(60, connect=CONNECT_TIMEOUT_S)) as client:
        try:
            r = client.get(f"{base}/v2/{ns}/{model}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT})
        except httpx.HTTPError as e:
            raise DownloadError(full, f"cannot fetch the manifest ({type(e).__name__})") from None
        if r.status_code == 404:
            raise DownloadError(full, f"the registry {base} has no such model or tag")
        if r.status_code != 200:
            raise DownloadError(full, f"the registry answered HTTP {r.status_code} for the manifest")
        try:
            manifest = r.json()
            layers = [manifest["config"], *manifest["layers"]] if manifest.get("config") else list(manifest["layers"])
        except (ValueError, KeyError, TypeError):
            raise DownloadError(full, "the manifest is not an Ollama/OCI manifest") from None
        total = sum(int(layer.get("size", 0)) for layer in layers)
        weights = sum(int(la.get("size", 0)) for la in layers if la.get("mediaType") == MODEL_MEDIA_TYPE)
        _check_weights_fit(full, weights)
        out.write(f"pulling {full} from {base}: {human(total)} in {len(layers)} blob(s)\n")
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        model_blob = None
        for layer in layers:
            m = _DIGEST.match(str(layer.get("digest")))
            if not m:
                raise DownloadError(full, f"layer digest {layer.get('digest')!r} is not sha256:<64 hex>")
            hexd = m.group(1).lower()
            blob = root / "blobs" / f"sha256-{hexd}"
            if layer.get("mediaType") == MODEL_MEDIA_TYPE:
                model_blob = blob
            if blob.exists() and sha256_file(blob) == hexd:
                continue
            if blob.exists():  # corrupt on disk: fetch again
                out.write(f"  {blob.name[:19]}: stored copy is corrupt, fetching it again\n")
                blob.unlink()
            url = f"{base}/v2/{ns}/{model}/blobs/sha256:{hexd}"
            _fetch_verified(client, url, blob, hexd, int(layer.get("size", 0)), out, f"{full} blob sha256:{hexd}")
    if model_blob is None:
        raise DownloadError(full, f"the manifest has no {MODEL_MEDIA_TYPE} layer")
    mpath = root / "manifests" / host / ns / model / tag
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest), encoding="utf-8")
    return {"name": full, **store.register(full, model_blob, source=f"ollama:{base}/{ns}/{model}:{tag}",
                                           fmt="ollama", quant=_ollama_quant(root, manifest), imported=False)}


def ollama_store_name(name: str) -> str:
    """The store's name for an Ollama model: ollama:MODEL:TAG (library models), else with namespace/host."""
    from .ollama import parse_name

    host, ns, model, tag = parse_name(name)
    if host == "registry.ollama.ai":
        return f"ollama:{model}:{tag}" if ns == "library" else f"ollama:{ns}/{model}:{tag}"
    return f"ollama:{host}/{ns}/{model}:{tag}"


def _check_weights_fit(full: str, weights: int) -> None:
    """Before the download: the GGUF's own size plus the runtime headroom must fit the memory left
    (the KV part of the plan is checked at load, once the file's shape is known)."""
    from ..errors import MemoryPlanError
    from ..loading.memory import available_bytes
    from .memplan import HEADROOM_BYTES

    avail = available_bytes()
    if avail is not None and weights + HEADROOM_BYTES > avail:
        raise MemoryPlanError(f"{full}: its weights take {human(weights)} and {human(avail)} of memory is available "
                              "(keeping 512 MiB free): pick a smaller quantization tag",
                              needed=weights + HEADROOM_BYTES,
                              available=avail)


def _ollama_quant(root: Path, manifest: dict[str, Any]) -> str | None:
    digest = str((manifest.get("config") or {}).get("digest", ""))
    try:
        cfg = json.loads((root / "blobs" / digest.replace(":", "-")).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("file_type") if isinstance(cfg, dict) else None


def pull(spec: str, *, confirm: Confirm | None = None, out: TextIO | None = None,
         plan_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    if spec.startswith("ollama:"):
        return pull_ollama(spec.removeprefix("ollama:"), out=out)
    return pull_catalog(spec, confirm=confirm, out=out, plan_kw=plan_kw)


def ensure(spec: str, *, confirm: Confirm | None = None, out: TextIO | None = None,
           plan_kw: dict[str, Any] | None = None) -> str:
    """What `slm run` / `slm serve` load for a spec. A catalog name resolves through the store (local
    first) and is pulled when missing, after confirm(message) agrees (None: proceed); a local folder or
    GGUF (given, or from the store) must pass the memory plan (MemoryPlanError otherwise). Anything
    else (a hub id, a cloud model, builtin) is returned unchanged."""
    import stat

    from ..loading.files import expand_user, stat_path
    from . import memplan
    from .catalog import is_catalog_name

    local = expand_user(spec)
    st = stat_path(local)  # a name the OS refuses is a ModelFileError, not an OSError
    if spec in ("builtin", "gemma3-270m") or spec.startswith("ollama:") or ":" in spec and not is_catalog_name(spec) \
            and st is None:
        return spec
    if st is not None and not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return spec  # a FIFO or device: the loader names it (and never blocks on it)
    if st is None:
        found = store.find(spec)
        if found is None and is_catalog_name(spec):
            found = pull_catalog(spec, confirm=confirm, out=out, plan_kw=plan_kw)
        if found is None:
            return spec
        local = Path(found["path"])
    if local.is_dir() and (local / "config.json").is_file() or local.is_file() and local.suffix == ".gguf":
        memplan.check(memplan.plan(local, **(plan_kw or {})))
    return str(local)
