"""`slm run`'s REPL commands, driven line by line as a user types them: /set parameter (Ollama's
names too) reaching the generation, /set system, /show info, /save and /load (the conversation
restored with its KV cache: the next turn prefills only the new message), bad input as one line."""
from __future__ import annotations

import io
import json
import re

import pytest

import slmkit
from slmkit.cli import main
from slmkit.cli_repl import repl


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return slmkit.load(make_phi3_folder(tmp_path_factory.mktemp("repl"), "gqa"), dtype="float32")


def drive(llm, lines, system=None, **options):
    """Run the REPL on these lines: (Repl, stdout, stderr)."""
    it = iter(lines)
    out, err = io.StringIO(), io.StringIO()
    r = repl(llm, {"max_new_tokens": 6, "temperature": 0, **options}, system, read=lambda _p: next(it),
             out=out, err=err, verbose=True)
    return r, out.getvalue(), err.getvalue()


def test_set_parameter_reaches_the_generation(llm):
    r, out, err = drive(llm, ["/set parameter temperature 1.5", "/set parameter seed 7",
                              "/set parameter num_predict 5", "/set parameter repeat_penalty 1.3", "hello", "/bye"])
    assert "error" not in err, err
    assert [r.opts.temperature, r.opts.seed, r.opts.max_new_tokens, r.opts.repetition_penalty] == [1.5, 7, 5, 1.3]
    expected = llm.chat([{"role": "user", "content": "hello"}], max_new_tokens=5, temperature=1.5, seed=7,
                        repetition_penalty=1.3)
    assert out.split("\n")[0] == expected.text  # the sampled answer of exactly these options
    assert re.search(r"output (\d+) tok", err).group(1) == str(expected.usage.completion_tokens)


def test_stop_takes_several_strings_and_num_predict_minus_one_is_no_limit(llm):
    r, _, err = drive(llm, ['/set parameter stop "<|end|>" "two words"', "/set parameter num_predict -1",
                            "/show parameters", "/bye"])
    assert r.opts.stop == ("<|end|>", "two words") and r.opts.max_new_tokens is None
    assert "stop ('<|end|>', 'two words')" in err


@pytest.mark.parametrize("line, named", [
    ("/set parameter nonsense 1", "nonsense"),
    ("/set parameter top_k 0.5", "top_k"),
    ("/set parameter temperature hot", "temperature"),
    ("/set parameter num_predict 0", "num_predict"),
    ("/set parameter top_p 1 2", "top_p"),
    ("/set parameter", "usage"),
    ("/set colour blue", "usage"),
    ("/show nothing", "usage"),
    ("/frobnicate", "/frobnicate"),
    ("/save ../escape", "../escape"),
    ("/load never-saved", "never-saved"),
])
def test_bad_commands_are_one_line_and_the_repl_goes_on(llm, line, named, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    r, out, err = drive(llm, [line, "hello", "/bye"])
    errors = [e for e in err.splitlines() if e.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err
    assert out.strip() and [m["role"] for m in r.session.messages] == ["user", "assistant"]  # still answering
    assert r.opts.max_new_tokens == 6 and r.opts.temperature == 0  # nothing half-set


def test_set_system_and_show_info(llm):
    r, out, err = drive(llm, ["hi", "/set system You are terse.", "/show system", "/show info", "hi again", "/bye"])
    assert r.session.messages[0] == {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in r.session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "You are terse." in err
    d = llm.describe()
    info = err[err.index("architecture"):]
    assert "phi3" in info and str(d.context_length) in info and d.chat_template[:20] in info
    assert re.search(r"parameters\s+[\d.]+M", info)
    # the second turn's prompt is the whole conversation with the system message in front
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tok", err)]
    assert prompts[1] == len(llm.chat_prompt(r.session.messages[:-1]))


def test_save_and_load_restore_the_conversation_and_its_cache(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    first, out1, err1 = drive(llm, ["/set parameter num_predict 4", "What is a GGUF file?", "And safetensors?",
                                    "/save chat-1", "/bye"], system="Be brief.")
    saved = json.loads((tmp_path / "sessions" / "chat-1.json").read_text())
    assert saved["messages"] == first.session.messages and saved["options"] == {"max_new_tokens": 4, "temperature": 0.0}
    assert "Saved session" in err1

    again, out2, err2 = drive(llm, ["/load chat-1", "/show parameters", "And ONNX?", "/bye"])
    assert "Loaded session 'chat-1': 2 turn(s)" in err2 and "max_new_tokens 4" in err2
    history = saved["messages"]
    assert again.session.messages[:5] == history
    # the answer is the stateless answer to the whole conversation ...
    whole = history + [{"role": "user", "content": "And ONNX?"}]
    assert out2.strip() == llm.chat(whole, max_new_tokens=4, temperature=0).text
    # ... and only the new message was prefilled: the loaded history's KV cache was rebuilt
    ids, before = llm.chat_prompt(whole), llm.chat_prompt(history)
    common = next((i for i, (a, b) in enumerate(zip(ids, before, strict=False)) if a != b), len(before))
    assert len(ids) - common - 1 <= again.session.last_prefill <= len(ids) - common < len(ids) // 2
    fresh = llm.session()
    fresh.messages[:] = history
    fresh.send("And ONNX?", max_new_tokens=4, temperature=0)
    assert fresh.last_prefill == len(ids)  # what a conversation without /load's priming costs


def test_saved_options_round_trip(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    first, _, _ = drive(llm, ["/set parameter num_predict -1", '/set parameter stop "a b" c',
                              "/set parameter top_k 5", "/save opts", "/bye"])
    again, _, err = drive(llm, ["/load opts", "/bye"], max_new_tokens=3)
    assert "error" not in err, err
    assert (again.opts.max_new_tokens, again.opts.stop, again.opts.top_k) == (None, ("a b", "c"), 5)
    assert again.opts == first.opts


def test_load_refuses_a_file_that_is_not_a_session(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path))
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "junk.json").write_text('{"messages": [{"role": "wizard"}]}')
    (tmp_path / "sessions" / "broken.json").write_text("{not json")
    (tmp_path / "sessions" / "badopt.json").write_text('{"messages": [], "options": {"top_k": -3}}')
    (tmp_path / "sessions" / "alien.json").write_text('{"messages": [], "options": {"scorers": 1}}')
    r, _, err = drive(llm, ["/load junk", "/load broken", "/load badopt", "/load alien", "/bye"])
    errors = [e for e in err.splitlines() if e.startswith("error: ")]
    assert len(errors) == 4 and "not a saved session" in errors[0] and "broken.json" in errors[1]
    assert "top_k" in errors[2] and "options must map" in errors[3] and r.opts.top_k is None


def test_help_lists_the_commands(llm, capsys, monkeypatch):
    lines = iter(["/help", "/bye"])
    monkeypatch.setattr("builtins.input", lambda _p: next(lines))
    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["run", str(llm.backend.path), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    for command in ("/set parameter", "/set system", "/show info", "/save", "/load", "/clear", "/bye"):
        assert command in err
