"""`slm run`'s interactive chat, with Ollama's REPL commands: /set parameter NAME VALUE, /set system,
/show info, /save NAME and /load NAME (the conversation as JSON in the sessions folder, restored
with its KV cache), /clear, /image, /help, /bye.

The conversation lives in a ChatSession, so each turn prefills only what the previous turn's
cache does not hold; /load re-runs the saved history once so the next turn prefills only the new
message."""
from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from . import cli_vision
from .errors import InvalidRequestError, SlmkitError
from .options import GenerationOptions

HELP = """Commands:
  /set parameter NAME VALUE   set a decoding option (temperature, top_p, top_k, min_p, seed,
                              num_predict / max_tokens, stop (one or more), repeat_penalty,
                              repeat_last_n, presence_penalty, frequency_penalty, num_ctx, ...)
  /set system TEXT            set the system message (the conversation is kept)
  /show info                  the model: architecture, parameters, quantization, context, template
  /show parameters            the options set so far;  /show system  the system message
  /save NAME                  save the conversation (in the store's sessions folder:
                              $SLMKIT_HOME/sessions, default ~/.cache/slmkit/sessions)
  /load NAME                  restore a saved conversation, its KV cache rebuilt
  /clear                      forget the conversation so far (and images not yet sent)
  /image PATH                 attach an image to your next message (vision models; repeatable)
  /bye                        leave (Ctrl-D too)
  \"\"\"                         start and end a multi-line message
  Ctrl-C                      stop the current answer"""

# Ollama's parameter names (and OpenAI's max_tokens) -> GenerationOptions fields
ALIASES = {"num_predict": "max_new_tokens", "max_tokens": "max_new_tokens", "repeat_penalty": "repetition_penalty",
           "repeat_last_n": "repetition_window", "num_ctx": "max_length"}
SETTABLE = ("temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "max_new_tokens", "max_length", "stop",
            "repetition_penalty", "repetition_window", "presence_penalty", "frequency_penalty",
            "no_repeat_ngram_size", "min_new_tokens", "ignore_eos")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def sessions_dir() -> Path:
    """Where /save writes: the store's sessions folder (slmkit.sources.store.home(): $SLMKIT_HOME,
    else $XDG_CACHE_HOME/slmkit, else ~/.cache/slmkit)."""
    from .sources.store import home

    return home() / "sessions"


def _value(text: str) -> Any:
    """A typed value from its spelling: 1 -> int, 0.5 -> float, true/false -> bool, else the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def set_parameter(opts: GenerationOptions, words: list[str]) -> tuple[GenerationOptions, str]:
    """opts with `NAME VALUE...` applied, and what to say; InvalidRequestError names a bad name or value."""
    if len(words) < 2:
        raise InvalidRequestError("usage: /set parameter NAME VALUE", param="parameter")
    given, values = words[0], words[1:]
    name = ALIASES.get(given.lower(), given.lower())
    if name not in SETTABLE:
        raise InvalidRequestError(f"unknown parameter {given!r} (known: {', '.join(SETTABLE + tuple(ALIASES))})",
                                  param=given)
    if name != "stop" and len(values) != 1:
        raise InvalidRequestError(f"takes one value, got {len(values)}", param=given)
    value = values if name == "stop" else _value(values[0])
    if name == "max_new_tokens" and value in (-1, -2):  # Ollama: no limit but the context
        value = None
    try:
        return opts.replace(**{name: value}), f"Set parameter '{given}' to '{' '.join(values)}'"
    except InvalidRequestError as e:  # name the parameter as typed (num_predict, not max_new_tokens)
        raise InvalidRequestError(str(e).removeprefix(f"{e.param}: "), param=given) from None


def show_info(llm: Any) -> str:
    d = llm.describe()
    template = (d.chat_template or "(none: plain completion)").strip()
    head = template if len(template) <= 160 else template[:160] + "..."
    params = f"{d.parameters / 1e9:.2f}B" if d.parameters >= 1e8 else f"{d.parameters / 1e6:.2f}M"
    return (f"  architecture   {d.model_type}\n  parameters     {params}\n"
            f"  quantization   {d.quantization or 'none (' + (d.dtype or 'float') + ')'}\n"
            f"  context        {d.context_length}\n  template       {head!r}")


def _session_path(name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(f"a session name is letters, digits, '.', '_' and '-' (at most 100), got "
                                  f"{name!r}", param="NAME")
    return sessions_dir() / f"{name}.json"


class Repl:
    """One interactive chat: the ChatSession, the options, and the commands that change them."""

    def __init__(self, llm: Any, options: GenerationOptions, system: str | None, *, out: TextIO, err: TextIO,
                 verbose: bool = False, raw: bool = False, images: list[dict] | None = None,
                 num_crops: int | None = None):
        self.llm, self.opts, self.out, self.err = llm, options, out, err
        self.verbose, self.raw, self.num_crops = verbose, raw, num_crops
        self.session = llm.session(system)
        self.pending = list(images or [])

    @property
    def _base(self) -> int:
        """Messages /clear keeps: the system message, if any."""
        m = self.session.messages
        return 1 if m and m[0]["role"] == "system" else 0

    def command(self, cmd: str) -> bool:
        """Run a /command; False when cmd is not one (a message to send)."""
        word, _, rest = cmd.partition(" ")
        rest = rest.strip()
        if word == "/clear":
            self.session.rewind_to(self._base)
            self.pending.clear()
            self.err.write("(conversation cleared)\n")
        elif word in ("/?", "/help"):
            self.err.write(HELP + "\n")
        elif word == "/image":
            self.err.write(cli_vision.attach(self.llm, cmd, self.pending, self.raw) + "\n")
        elif word == "/set":
            self._set(rest)
        elif word == "/show":
            self._show(rest)
        elif word == "/save":
            self._save(rest)
        elif word == "/load":
            self._load(rest)
        elif len(word) > 1 and word.startswith("/") and "/" not in word[1:]:  # (/usr/bin/... is a message)
            raise InvalidRequestError(f"unknown command {word!r} (/help lists them)", param="command")
        else:
            return False
        return True

    def _set(self, rest: str) -> None:
        what, _, arg = rest.partition(" ")
        if what == "parameter":
            try:
                words = shlex.split(arg)
            except ValueError as e:
                raise InvalidRequestError(f"cannot read {arg!r}: {e}", param="parameter") from None
            self.opts, said = set_parameter(self.opts, words)
            self.err.write(said + "\n")
        elif what == "system":
            text = arg.strip().strip('"')
            m = self.session.messages
            if self._base:
                m.pop(0)
            if text:
                m.insert(0, {"role": "system", "content": text})
            self.err.write("Set system message.\n" if text else "Cleared system message.\n")
        else:
            raise InvalidRequestError("usage: /set parameter NAME VALUE, or /set system TEXT", param="set")

    def _show(self, what: str) -> None:
        if what == "info":
            self.err.write(show_info(self.llm) + "\n")
        elif what == "parameters":
            shown = {n: getattr(self.opts, n) for n in SETTABLE if n in self.opts.changed()}
            self.err.write("\n".join(f"  {n} {v!r}" for n, v in shown.items()) or "  (the defaults)")
            self.err.write("\n")
        elif what == "system":
            self.err.write((self.session.messages[0]["content"] if self._base else "(no system message)") + "\n")
        else:
            raise InvalidRequestError("usage: /show info, /show parameters or /show system", param="show")

    def _save(self, name: str) -> None:
        path = _session_path(name)
        data = {"model": self.llm.name, "messages": self.session.messages,
                "options": {n: getattr(self.opts, n) for n in SETTABLE if n in self.opts.changed()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            raise InvalidRequestError(f"cannot write {path}: {e.strerror or e}", param="NAME") from None
        self.err.write(f"Saved session to {path}\n")

    def _load(self, name: str) -> None:
        path = _session_path(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            saved = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
            raise InvalidRequestError(f"no saved session {name!r} in {path.parent} (saved: "
                                      f"{', '.join(saved) or 'none'})", param="NAME") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InvalidRequestError(f"cannot read {path}: {e}", param="NAME") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and "content" in m
                for m in messages):
            raise InvalidRequestError(f"{path} is not a saved session (no list of role/content messages)",
                                      param="NAME")
        stored = data.get("options") or {}
        if not isinstance(stored, dict) or not set(stored) <= set(SETTABLE):
            raise InvalidRequestError(f"{path}: options must map some of {', '.join(SETTABLE)} to values",
                                      param="NAME")
        try:
            opts = self.opts.replace(**stored)  # validated: a hand-edited file says which value is wrong
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}: {e}", param="NAME") from None
        before = list(self.session.messages)
        self.session.messages[:] = messages
        try:
            self.session.prime(**cli_vision.chat_kwargs(self.num_crops))
        except SlmkitError:
            self.session.messages[:] = before
            raise
        self.opts = opts
        self.pending.clear()
        turns = sum(m["role"] == "user" for m in messages)
        note = "" if data.get("model") == self.llm.name else f" (saved with model {data.get('model')!r})"
        self.err.write(f"Loaded session {name!r}: {turns} turn(s){note}\n")

    def send(self, text: str) -> None:
        """Answer one message (streamed to out); a failed turn leaves the conversation as it was."""
        kept = len(self.session.messages)
        answer_opts = {"options": self.opts, **cli_vision.chat_kwargs(self.num_crops)}
        content = cli_vision.user_content(text, self.pending)
        self.pending = []
        last = None
        try:
            if self.raw:
                chunks = self.llm.generate(text, self.opts, stream=True)
            else:
                chunks = self.session.send(content, stream=True, **answer_opts)
            for chunk in chunks:
                self.out.write(chunk.text)
                self.out.flush()
                last = chunk
        except KeyboardInterrupt:
            self.err.write("\n(stopped)")  # the partial answer stays in the conversation
        except SlmkitError:  # e.g. the conversation outgrew the context: the REPL goes on without this turn
            self.session.rewind_to(kept)
            raise
        self.out.write("\n")
        if self.verbose:
            report(last, self.err)


def report(last: Any, err: TextIO) -> None:
    """Token counts and rates of the answer whose last chunk this is (-v)."""
    if last is None or last.usage is None:
        return
    u, t = last.usage, last.timings
    err.write(f"\n[prompt {u.prompt_tokens} tok, {t.prefill_tokens_per_s(u.prompt_tokens):.1f} tok/s | "
              f"output {u.completion_tokens} tok, {t.decode_tokens_per_s(u.completion_tokens):.2f} tok/s | "
              f"finish: {last.finish_reason}]\n")


def _read_message(read: Callable[[str], str]) -> str | None:
    """One user message: a line, or a \"\"\"-fenced block. None at end of input."""
    try:
        line = read(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    parts = [line.lstrip()[3:]]
    while True:
        if parts[-1].rstrip().endswith('"""') and (len(parts) > 1 or parts[0].strip() != ""):
            parts[-1] = parts[-1].rstrip()[:-3]
            return "\n".join(parts).strip("\n")
        try:
            parts.append(read("... "))
        except EOFError:
            return "\n".join(parts).strip("\n")


def repl(llm: Any, options: GenerationOptions | dict, system: str | None, *, read: Callable[[str], str] | None = None,
         out: TextIO | None = None, err: TextIO | None = None, verbose: bool = False, raw: bool = False,
         images: list[dict] | None = None, num_crops: int | None = None) -> Repl:
    """Interactive chat until /bye or end of input; returns the Repl (its session and options).
    raw=True: each message is completed as plain text. options: GenerationOptions, or generate()'s
    keyword arguments. images: image parts for the first message (--image / --video)."""
    opts = options if isinstance(options, GenerationOptions) else GenerationOptions.from_kwargs(**options)
    # looked up now, not at import: a test may have replaced them
    read, out, err = read or input, out or sys.stdout, err or sys.stderr
    r = Repl(llm, opts, system, out=out, err=err, verbose=verbose, raw=raw, images=images, num_crops=num_crops)
    err.write("Chat with the model. /bye to leave, /clear to start over, /? for help.\n")
    while True:
        text = _read_message(read)
        if text is None or text.strip() in ("/bye", "/exit", "/quit"):
            out.write("\n" if text is None else "")
            return r
        cmd = text.strip()
        try:
            if cmd and not r.command(cmd):
                r.send(text)
        except SlmkitError as e:  # one clear line; the REPL goes on
            err.write(f"error: {e}\n")
