"""`slm` command line: `slm run MODEL [PROMPT]` streams an answer or opens a chat REPL;
`slm serve [MODEL ...]` serves OpenAI / Ollama APIs; `slm quantize SRC DST --quant int4` writes a
quantized model folder; `slm compare MODEL MODEL ... -p PROMPT` runs one prompt on several
(cli_compare.py); `slm ps` lists what a running server has loaded (cli_ps.py)."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from . import cli_compare, cli_ps, cli_ray, cli_store, cli_vision
from .cli_repl import repl, write_chunk
from .cli_repl import report as _report
from .errors import SlmkitError
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

BASE_MODEL_MAX_NEW_TOKENS = 128  # a base model's completion rarely stops by itself: a shorter default

def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate per answer (default {DEFAULT_MAX_NEW_TOKENS} in chat, "
                        f"{BASE_MODEL_MAX_NEW_TOKENS} for base-model completion)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's setting)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--speculative", choices=["auto", "none", "ngram", "draft"], default=None,
                   help="speculative decoding: ngram = prompt lookup, draft = with --draft MODEL (default auto: "
                        "prompt lookup for long prompts, the draft model when one is given)")
    p.add_argument("--draft", default=None, metavar="MODEL", help="a smaller model with the same tokenizer that "
                   "drafts tokens for the main one to verify")
    p.add_argument("--num-draft", type=int, default=None, help="tokens drafted per step (default 4)")


def generation_options(a: argparse.Namespace, raw: bool, draft: Any = None) -> GenerationOptions:
    """The sampling flags as GenerationOptions (raw: plain completion, with its shorter default;
    draft: the loaded --draft model)."""
    default = BASE_MODEL_MAX_NEW_TOKENS if raw else DEFAULT_MAX_NEW_TOKENS
    return GenerationOptions.from_kwargs(max_new_tokens=a.max_tokens if a.max_tokens is not None else default,
                                         temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                                         stop=a.stop, speculative=getattr(a, "speculative", None), draft=draft,
                                         num_draft=getattr(a, "num_draft", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="Run small language models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt, or chat interactively without one")
    run.add_argument("model", nargs="?", default="builtin",
                     help="'builtin' (default: Gemma 3 270M base), a .gguf file, ollama:NAME, a Hugging Face "
                          "folder (config.json + *.safetensors + tokenizer) or hub id")
    run.add_argument("prompt", nargs="?", help="the prompt; without it, an interactive session (or stdin if piped)")
    run.add_argument("--system", default=None, help="system message")
    run.add_argument("--hide-thinking", action="store_true", help="leave out a reasoning model's <think> block "
                     "(shown dimmed by default)")
    style = run.add_mutually_exclusive_group()
    style.add_argument("--raw", action="store_true", help="plain completion of the prompt, no chat template "
                       "(the default for base models without a chat template, like the built-in one)")
    style.add_argument("--chat", action="store_true", help="use the chat template even for a base model")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--device", default="cpu")
    run.add_argument("--verbose", "-v", action="store_true", help="print load time and tokens/s")
    run.add_argument("--show-experts", action="store_true", help="mixture-of-experts models: after the answer, "
                     "print which experts each layer chose for its tokens (to stderr)")
    run.add_argument("--yes", "-y", action="store_true", help="pull a catalog model that is not in the store "
                     "without asking (without a terminal it proceeds anyway, and says so)")
    _add_quant_args(run)
    _add_sampling_args(run)
    cli_vision.add_vision_args(run, _positive)
    srv = sub.add_parser("serve", help="serve models over OpenAI- and Ollama-compatible HTTP APIs")
    srv.add_argument("models", nargs="*", default=["builtin"], help="models to load (default: builtin); "
                     "NAME=PATH names one, else the file or folder name is its API name")
    srv.add_argument("--host", type=_host, default="127.0.0.1",
                     help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    srv.add_argument("--api-key", default=None, help="required bearer key on every route (or $SLMKIT_API_KEY)")
    srv.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before 503 + retry-after")
    srv.add_argument("--cors", action="append", default=None, help="allowed CORS origin (repeatable; off by default)")
    srv.add_argument("--slots", type=_positive, default=4, help="concurrent sequences per model, batched continuously "
                     "(1 = one request at a time)")
    srv.add_argument("--slot-context", type=_positive, default=None, help="tokens per slot (default: the model's "
                     "context, at most 4096); the KV memory slots x context is allocated at start-up and printed")
    srv.add_argument("--keep-alive", default="-1", help="unload a model after this long idle (e.g. 5m, 30s; "
                     "-1 = never, the default); a request reloads it. Ollama's keep_alive per request overrides it")
    srv.add_argument("--max-loaded", type=_positive, default=None, help="models loaded at once; loading one more "
                     "unloads the least recently used idle one")
    srv.add_argument("--image-urls", action="store_true", help="fetch http(s) image URLs from remote hosts "
                     "(off by default: data: URLs and this machine's URLs only)")
    srv.add_argument("--image-url-host", action="append", default=None, help="fetch image URLs from this remote "
                     "host too (repeatable; the only remote hosts allowed)")
    srv.add_argument("--max-body", type=_size, default=None, help="largest request body, in bytes or with a "
                     "K/M/G suffix (powers of 1024; default 96M, room for a request's 64M of images base64-encoded); "
                     "larger ones get 413")
    srv.add_argument("--header-timeout", type=_seconds, default=10.0, help="seconds a connection has to send its "
                     "request headers (default 10); slower ones are closed")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _add_quant_args(srv)
    cli_ray.add_ray_args(srv, _positive)
    q = sub.add_parser("quantize", help="write a weight-only quantized copy of a model (a safetensors folder)")
    q.add_argument("src", help="a Hugging Face folder, .gguf file, hub id or 'builtin'")
    q.add_argument("dst", help="the folder to write (must not exist, or be empty)")
    _add_quant_args(q, required=True)
    cli_compare.add_parser(sub)
    cli_ps.add_parser(sub)
    cli_store.add_parsers(sub, _positive)
    return parser


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a named usage error otherwise)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _port(text: str) -> int:
    """argparse type: a TCP port 1-65535 (0, "any free port", would serve on a port nobody is told)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {v}")
    return v


def _host(text: str) -> str:
    """argparse type: an address this machine can bind (an IP address, or a name that resolves)."""
    import socket

    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not an address to listen on: {text!r} ({e})") from None
    return text


_UNITS = {"": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30}


def _size(text: str) -> int:
    """argparse type: a positive byte count, e.g. 1048576, 512K, 16M, 1G."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"must be a size like 16M, 512K or a byte count, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _add_quant_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    quants = ["int8", "int4", "int4-mixed", "int4-k", "int4-km"]
    p.add_argument("--quant", choices=quants if required else [*quants, "none"],
                   required=required, default=None,
                   help="weight-only quantization of the float weights (int4-mixed: int4 with the k/v "
                        "projections at int8; int4-k: the same with two-level scales, fewer bits; int4-km: int4-k "
                        "with down_proj int8 where Q4_K_M keeps it at more bits and a calibrated fit; GGUF files "
                        "run their own quantized weights without it; 'none' dequantizes them)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help="inputs per quantization group (default 32; larger is smaller and faster, less accurate)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options may come before or after the positionals (`slm run MODEL --temperature 0.7 "prompt"`):
    argparse's intermixed parsing does that, but not through subparsers, so each subcommand's own
    parser takes the words after its name."""
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if argv[0] in sub.choices:
            args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
            args.command = argv[0]
            return args
    return parser.parse_args(argv)


def _stream_out(chunks: Iterator[Any], out: TextIO, routing: list | None = None, hide_thinking: bool = False) -> Any:
    """Print chunks as they come; return the last one (finish reason, usage, timings). routing:
    where the chunks' expert routing is collected (return_routing)."""
    last = None
    state: dict = {}
    for chunk in chunks:
        write_chunk(chunk, out, hide_thinking, state)
        if routing is not None and chunk.routing:
            routing.extend(chunk.routing)
        last = chunk
    return last


def experts_table(routing: list[Any]) -> str:
    """A compact per-layer usage table of TokenRouting entries: each layer's experts by how many of
    the tokens chose them (first or second), most used first, with their mean weight."""
    if not routing:
        return "[no routing recorded]"
    n_layers = len(routing[0].experts)
    lines = [f"[experts chosen for {len(routing)} tokens; per layer: expert×tokens (mean weight)]"]
    for layer in range(n_layers):
        count: dict[int, int] = {}
        weight: dict[int, float] = {}
        for r in routing:
            for e, w in zip(r.experts[layer], r.weights[layer]):
                count[e] = count.get(e, 0) + 1
                weight[e] = weight.get(e, 0.0) + w
        ranked = sorted(count, key=lambda e: (-count[e], e))
        lines.append(f"L{layer:02d} " + " ".join(f"e{e}×{count[e]}({weight[e] / count[e]:.2f})" for e in ranked))
    return "\n".join(lines)


def cmd_run(a: argparse.Namespace) -> int:
    from .api import load

    media = cli_vision.media_parts(a)  # image and video files checked before minutes of loading
    model = cli_store.prepare(a.model, yes=a.yes, quant=a.quant)  # catalog names pulled; the memory plan first
    t0 = time.perf_counter()
    llm = load(model, dtype=a.dtype, device=a.device, quant=a.quant, group_size=a.group_size)
    if a.verbose:
        sys.stderr.write(f"[loaded {llm.name} in {time.perf_counter() - t0:.2f} s, {_describe(llm)}]\n")
    raw = a.raw or (llm.prompt_style == "completion" and not a.chat)
    if media:
        cli_vision.check_takes_images(llm, raw, "--image" if a.image else "--video")
    crops = cli_vision.num_crops(a)
    draft = None
    if a.draft is not None:  # the draft model loads as the main one does
        draft = load(cli_store.prepare(a.draft, yes=a.yes, quant=a.quant), dtype=a.dtype, device=a.device,
                     quant=a.quant, group_size=a.group_size)
    opts = generation_options(a, raw, draft)
    if a.show_experts:
        opts = opts.replace(return_routing=True)  # a model without routing refuses it, naming the option
    prompt = a.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None:
        if raw:
            sys.stderr.write(f"[{llm.name} is a base model: each line you type is continued as text]\n")
        if media:
            sys.stderr.write(f"[{len(media)} image(s) attached to your first message]\n")
        repl(llm, opts, a.system, verbose=a.verbose, raw=raw, images=media, num_crops=crops,
             hide_thinking=a.hide_thinking)
        return 0
    if raw:
        chunks = llm.generate(prompt, opts, stream=True)
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": cli_vision.user_content(prompt, media)}]
        chunks = llm.chat(messages, stream=True, options=opts, **cli_vision.chat_kwargs(crops))
    routing: list | None = [] if a.show_experts else None
    last = _stream_out(chunks, sys.stdout, routing, a.hide_thinking)
    sys.stdout.write("\n")
    if routing is not None:
        sys.stderr.write(experts_table(routing) + "\n")
    if a.verbose:
        _report(last, sys.stderr)
    return 0


def _describe(llm: Any) -> str:
    """dtype, and how the quantized layers run: the VNNI kernel or the PyTorch fallback."""
    d = llm.describe()
    return f"{d.dtype}, {d.quantization}" if d.quantization else d.dtype


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from .server.app import create_app
    except ImportError:
        sys.stderr.write("error: slm serve needs fastapi and uvicorn (pip install 'slmkit[serve]')\n")
        return 1
    from .errors import ModelUnavailableError
    from .server.loader import model_loader
    from .server.registry import ModelSpec, parse_keep_alive

    try:
        keep_alive = parse_keep_alive(a.keep_alive, "--keep-alive")
    except SlmkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2

    problem = _cannot_listen(a.host, a.port) if not a.ray else None  # a cluster's proxy is on its head node
    if problem:  # before minutes of loading models
        sys.stderr.write(f"error: cannot listen on {a.host}:{a.port}: {problem}\n")
        return 1

    models: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for spec in a.models:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or served_name(path)
        path = cli_store.prepare(path, yes=True, quant=a.quant, ctx=a.slot_context, parallel=max(1, a.slots),
                                 flags={"ctx": "--slot-context", "parallel": "--slots"})
        if name in models or name in paths:
            sys.stderr.write(f"error: two models are named {name!r}; name one NAME=PATH\n")
            return 2
        if a.ray is not None:
            paths[name] = path
            continue
        models[name] = ModelSpec(model_loader(name, path, dtype=a.dtype, quant=a.quant, group_size=a.group_size,
                                              slots=a.slots, slot_context=a.slot_context), slots=max(1, a.slots))
    key = a.api_key or os.environ.get("SLMKIT_API_KEY")
    if a.ray is not None:
        return cli_ray.serve_on_ray(a, paths, key, keep_alive, _size)
    hosts = a.image_url_host or []
    try:
        app = create_app(models, api_key=key, max_queue=a.max_queue, cors_origins=a.cors, keep_alive=keep_alive,
                         max_loaded=a.max_loaded, image_urls=hosts if hosts else bool(a.image_urls),
                         **({"max_body": a.max_body} if a.max_body else {}))
    except ModelUnavailableError as e:
        cause = e.__cause__
        sys.stderr.write(f"error: {cause if isinstance(cause, SlmkitError) else e}\n")
        return 1
    forever = "kept loaded" if keep_alive is None else f"unloaded after {a.keep_alive} idle"
    sys.stderr.write(f"[serving {', '.join(models)} on http://{a.host}:{a.port}/v1 (OpenAI) and /api (Ollama)"
                     f"{', API key required' if key else ''}; models {forever}]\n")
    from .server.protocol import uvicorn_options

    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", **uvicorn_options(a.header_timeout))
    return 0


def served_name(path: str) -> str:
    """The API name of a model given without NAME=: builtin and ollama:NAME as given, a cloud model
    its id's last part (openai:MODEL@URL: MODEL), a file or folder its name (.gguf dropped)."""
    from pathlib import Path

    from .backends.registry import split_spec

    if path in ("builtin", "gemma3-270m") or path.startswith("ollama:"):
        return path
    provider, target = split_spec(path)
    if provider in ("github", "azure", "nim", "openai"):
        return (target.rpartition("@")[0] if provider == "openai" else target).rstrip("/").rsplit("/", 1)[-1]
    return Path(target).name.removesuffix(".gguf")


def _cannot_listen(host: str, port: int) -> str | None:
    """Why uvicorn could not bind host:port (in use, not this machine's address, ...), or None."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(addr)
    except OSError as e:
        return e.strerror or str(e)
    return None


def cmd_quantize(a: argparse.Namespace) -> int:
    from .api import quantize

    t0 = time.perf_counter()
    out, llm = quantize(a.src, a.dst, quant=a.quant, group_size=a.group_size)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e9
    sys.stderr.write(f"wrote {out} ({size:.2f} GB, {_describe(llm)}) in {time.perf_counter() - t0:.1f} s\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import readline  # noqa: F401  (line editing and history in the REPL)
    except ImportError:
        pass
    try:
        return {"run": cmd_run, "quantize": cmd_quantize, "serve": cmd_serve,
                "compare": cli_compare.cmd_compare, "ps": cli_ps.cmd_ps, **cli_store.COMMANDS}[args.command](args)
    except SlmkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
