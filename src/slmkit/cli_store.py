"""`slm catalog`, `slm plan`, `slm pull`, `slm import`, `slm list`, `slm show`, `slm rm`: the model
catalog, the memory plan and the local store ($SLMKIT_HOME, default $XDG_CACHE_HOME/slmkit or
~/.cache/slmkit). `slm run NAME` pulls a catalog model that is not in the store after saying what and
how big: on a terminal it asks first (unless --yes); without one it proceeds and says so."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from .sources import catalog, memplan, store
from .sources import pull as pulling


def add_parsers(sub: Any, positive: Callable[[str], int]) -> None:
    c = sub.add_parser("catalog", help="the models slmkit knows by name (Phi family, builtin)")
    c.add_argument("--json", action="store_true")
    p = sub.add_parser("plan", help="will a model fit this machine? weights, KV cache, images, before any download")
    p.add_argument("model", help="a catalog name[:tag], a Hugging Face folder or a .gguf file")
    p.add_argument("--quant", default=None, choices=sorted(memplan.QUANT_BITS),
                   help="precision of the weights (default: the variant's or the files' own)")
    p.add_argument("--ctx", type=positive, default=None, help="tokens of context per slot (default: min(model, 4096))")
    p.add_argument("--parallel", type=positive, default=1, help="slots served at once (default 1)")
    p.add_argument("--images", type=int, default=0, help="images per request (vision models)")
    p.add_argument("--device", default="cpu", help="cpu (RAM) or cuda (GPU memory)")
    p.add_argument("--json", action="store_true")
    pl = sub.add_parser("pull", help="download a catalog model (NAME[:TAG]) or ollama:NAME into the store")
    pl.add_argument("model")
    pl.add_argument("--yes", "-y", action="store_true", help="do not ask before downloading")
    pl.add_argument("--quant", default=None, choices=sorted(memplan.QUANT_BITS), help="precision the plan assumes")
    pl.add_argument("--ctx", type=positive, default=None, help="context the plan assumes")
    i = sub.add_parser("import", help="register a Hugging Face folder or .gguf file in the store (no copy)")
    i.add_argument("path")
    i.add_argument("--name", default=None, help="its store name (default: the folder or file name)")
    ls = sub.add_parser("list", help="models in the store: name, size, quantization, modified")
    ls.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="architecture, parameters, quantization, context, template, licence, capabilities")
    sh.add_argument("model")
    sh.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="remove a model from the store (imported files are left where they are)")
    rm.add_argument("model")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def cmd_catalog(a: argparse.Namespace) -> int:
    items = [e.as_dict() for e in catalog.entries().values()]
    if a.json:
        print(json.dumps(items, indent=1))
        return 0
    print(f"{'NAME':22}{'PARAMS':>8}  {'CONTEXT':>8}  {'INPUT':18}{'TAGS'}")
    for e in items:
        tags = ", ".join(t + ("*" if t == e["default"] else "") for t in e["variants"])
        print(f"{e['name']:22}{e['params'] / 1e9:7.2f}B  {e['context']:>8}  {'+'.join(e['modalities']):18}{tags}")
    print("(* the default tag; `slm show NAME` for repos, licence and cloud ids)")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    p = memplan.plan(a.model, quant=a.quant, ctx=a.ctx, parallel=a.parallel, images=a.images, device=a.device)
    print(json.dumps(p.as_dict(), indent=1) if a.json else p.message())
    return 0 if p.fits else 1


def confirm_on_tty(yes: bool) -> Callable[[str], bool]:
    """Ask on a terminal (unless yes); without one, proceed and say so."""
    def confirm(message: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            sys.stderr.write(f"{message}\n(no terminal to ask: proceeding; --yes skips this note)\n")
            return True
        answer = input(f"{message}. Download? [y/N] ").strip().lower()
        return answer in ("y", "yes")
    return confirm


def cmd_pull(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    kw = {"quant": a.quant, "ctx": a.ctx}
    entry = pulling.pull(a.model, confirm=confirm_on_tty(a.yes), plan_kw={k: v for k, v in kw.items() if v})
    sys.stderr.write(f"{entry['name']}: ready at {entry['path']} ({time.perf_counter() - t0:.1f} s)\n")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    entry = store.import_path(a.path, a.name)
    sys.stderr.write(f"imported {entry['name']} -> {entry['path']} ({entry['quant']}; not copied)\n")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    rows = store.list_models()
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':34}{'SIZE':>10}  {'QUANT':14}{'MODIFIED'}")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"])) if r["modified"] else "-"
        size = _gb(r["size"]) if r["present"] else "missing"
        print(f"{r['name']:34}{size:>10}  {str(r['quant'] or '-'):14}{when}")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    info = store.show(a.model)
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for key in ("name", "path", "architecture", "parameters", "quantization", "context", "licence", "capabilities"):
        value = info.get(key)
        if key == "parameters" and value:
            value = f"{value / 1e9:.2f}B ({value})"
        if key == "capabilities":
            value = ", ".join(value or [])
        print(f"{key:14}{value if value is not None else '-'}")
    template = info.get("template")
    print(f"{'template':14}{(template[:200] + ('...' if len(template) > 200 else '')) if template else '-'}")
    cat = info.get("catalog")
    if cat:
        for tag, v in cat["variants"].items():
            print(f"{'tag ' + tag:14}{v.get('repo') or v.get('package')} {v.get('file') or v.get('subfolder') or ''}")
        clouds = ", ".join(f"{k}:{v}" for k, v in cat["cloud"].items() if v)
        print(f"{'ollama':14}{cat['ollama'] or '-'}\n{'cloud':14}{clouds or '-'}")
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    gone = store.remove(a.model)
    sys.stderr.write(f"removed {gone['name']}" + (" (imported: its files are left in place)\n"
                                                  if gone.get("imported") else "\n"))
    return 0


COMMANDS = {"catalog": cmd_catalog, "plan": cmd_plan, "pull": cmd_pull, "import": cmd_import, "list": cmd_list,
            "show": cmd_show, "rm": cmd_rm}


def prepare(spec: str, *, yes: bool, quant: str | None, ctx: int | None = None, parallel: int = 1,
            flags: dict[str, str] | None = None) -> str:
    """`slm run` / `slm serve`: a catalog name resolves through the store (pulled if missing, after
    saying what and how big); a local model must pass the memory plan (MemoryPlanError otherwise)."""
    kw: dict[str, Any] = {"quant": quant, "ctx": ctx, "parallel": parallel, "flags": flags}
    return pulling.ensure(spec, confirm=confirm_on_tty(yes), plan_kw={k: v for k, v in kw.items() if v})
