"""`slm run`: one-shot streaming, stdin prompts, the REPL (history, /clear, multi-line, /bye), errors."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

import slmkit
from slmkit.cli import main, repl
from slmkit.errors import ModelFileError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return make_phi3_folder(tmp_path_factory.mktemp("cli"), "gqa")


def test_run_prompt_streams_answer(folder, capsys):
    rc = main(["run", str(folder), "Why is the sky blue?", "--max-tokens", "12", "--temperature", "0",
               "--dtype", "float32", "--verbose"])
    out, err = capsys.readouterr()
    llm = slmkit.load(folder, dtype="float32")
    expected = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=12, temperature=0)
    assert rc == 0 and out == expected.text + "\n"
    assert re.search(r"output \d+ tok, [\d.]+ tok/s", err) and "loaded" in err


def test_run_raw_and_stop(folder, capsys):
    llm = slmkit.load(folder, dtype="float32")
    full = llm.generate("The sky", max_new_tokens=16, temperature=0).text
    rc = main(["run", str(folder), "The sky", "--raw", "--max-tokens", "16", "--temperature", "0",
               "--dtype", "float32", "--stop", full[4:7]])
    out, _ = capsys.readouterr()
    assert rc == 0 and out == full[: full.index(full[4:7])] + "\n"


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    rc = main(["run", str(tmp_path / "nope"), "hi"])
    _, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: ") and "nope" in err and "Traceback" not in err


def test_repl_history_clear_multiline_bye(folder):
    llm = slmkit.load(folder, dtype="float32")
    lines = iter(["hello", '"""first line', "second line", 'end"""', "/clear", "hello", "/bye", "never read"])
    out, err = io.StringIO(), io.StringIO()
    repl(llm, dict(max_new_tokens=6, temperature=0), "Be brief.", read=lambda _p: next(lines), out=out, err=err,
         verbose=True)
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tok", err.getvalue())]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0]  # second turn carries the first in its history
    assert prompts[2] == prompts[0]  # /clear forgot it (the system message stays)
    assert "(conversation cleared)" in err.getvalue()
    answers = out.getvalue().split("\n")
    assert answers[0] == answers[2]  # same greedy answer to the same fresh question
    assert next(lines) == "never read"  # /bye left the loop
    multi = llm.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": answers[0]},
                        {"role": "user", "content": "first line\nsecond line\nend"}]).text
    assert prompts[1] == len(llm.tokenizer.encode(multi, add_special_tokens=False))


def test_repl_ends_on_eof(folder):
    llm = slmkit.load(folder, dtype="float32")

    def read(_p):
        raise EOFError

    repl(llm, dict(max_new_tokens=2), None, read=read, out=io.StringIO(), err=io.StringIO())


def test_options_may_follow_the_prompt(folder, capsys):
    rc = main(["run", str(folder), "--raw", "The sky", "--max-tokens", "4", "--temperature", "0", "--dtype", "float32"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.strip()


def _model_argument(kind, tmp_path):
    """A model argument the OS or the loaders cannot use, of the given kind."""
    if kind == "long":
        return "m" * 5000  # OSError: file name too long, raised by Path.exists()
    if kind == "nul":
        return "model\x00name"  # ValueError: embedded null byte
    if kind == "unknown-user":
        return "~no_such_user_slmkit/model"  # RuntimeError from expanduser
    if kind in ("fifo", "fifo.gguf"):
        os.mkfifo(tmp_path / kind)  # open() for reading would wait for a writer forever
        return str(tmp_path / kind)
    if kind == "device":
        return os.devnull
    (tmp_path / "empty").mkdir()  # a folder without config.json
    return str(tmp_path / "empty")


def _unblock(path):
    """Give a reader stuck in open() on a FIFO its end of file (only the old code got stuck)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader is waiting: nothing to release


KINDS = ["long", "nul", "unknown-user", "fifo", "fifo.gguf", "device", "no-config"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["run", "serve"])
def test_unusable_model_argument_is_one_error_line(kind, command, tmp_path, capsys):
    name = _model_argument(kind, tmp_path)
    argv = [command, name, "hi"] if command == "run" else [command, name]
    result = []
    worker = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    worker.start()
    worker.join(120)  # a hang detector, not a speed limit: the old code never returned for a FIFO
    if worker.is_alive():
        _unblock(name)
        worker.join(10)
    _, err = capsys.readouterr()
    assert result == [1], f"no exit status (hung?): {err[-300:]}"
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert len(err) < 600  # a 5000-character name is cut in the message


@pytest.mark.parametrize("kind", KINDS)
def test_unusable_model_argument_is_a_model_file_error(kind, tmp_path):
    name = _model_argument(kind, tmp_path)
    raised = []

    def load():
        try:
            slmkit.load(name)
        except Exception as e:  # noqa: BLE001 -- the type is what is tested
            raised.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(120)  # a hang detector, as above
    if worker.is_alive():
        _unblock(name)
    assert len(raised) == 1 and isinstance(raised[0], ModelFileError), raised


def test_unreadable_model_folder(folder, tmp_path, capsys, monkeypatch):
    """Permission denied (simulated: the tests may run as root, who reads everything)."""
    path = shutil.copytree(folder, tmp_path / "m")
    real_stat = Path.stat

    def stat(self, *a, **kw):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    assert main(["run", str(path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "permission denied" in err
