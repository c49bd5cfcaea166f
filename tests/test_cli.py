"""`slm run`: one-shot streaming, stdin prompts, the REPL (history, /clear, multi-line, /bye), errors."""
from __future__ import annotations

import io
import re

import pytest

import slmkit
from slmkit.cli import main, repl


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
