"""`slm run --image / --video / --num-crops` and the chat's /image, on tiny text and vision folders."""
from __future__ import annotations

import io
import re

import pytest

import slmkit
from slmkit.cli import HELP_REPL, main, repl


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return make_phi3_folder(tmp_path_factory.mktemp("cli_text"), "gqa")


def _png(path, size=(40, 30), color=(200, 30, 30)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return str(path)


def test_an_image_for_a_text_only_model_is_one_error_line(text_folder, tmp_path, capsys):
    rc = main(["run", str(text_folder), "--image", _png(tmp_path / "a.png"), "Describe it", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "text-only" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "needle"), [
    (["--image", "missing.png"], "missing.png"),
    (["--frames", "4"], "--frames: needs --video"),
    (["--video", "missing.mp4"], "missing.mp4"),
])
def test_bad_media_arguments_fail_before_the_model_loads(tmp_path, capsys, args, needle):
    rc = main(["run", str(tmp_path / "no-model-here"), "hi", *args])  # the model would fail to load
    _, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: ") and needle in err and "no-model-here" not in err


def test_repl_image_command_on_a_text_only_model_says_so_and_goes_on(text_folder, tmp_path):
    llm = slmkit.load(text_folder, dtype="float32")
    lines = iter(["/image", f"/image {_png(tmp_path / 'a.png')}", "/?", "hello", "/bye"])
    out, err = io.StringIO(), io.StringIO()
    repl(llm, dict(max_new_tokens=4, temperature=0), None, read=lambda _p: next(lines), out=out, err=err,
         verbose=True)
    text = err.getvalue()
    assert "usage: /image PATH" in text and "text-only" in text and "/image PATH" in HELP_REPL
    assert HELP_REPL in text and len(re.findall(r"\[prompt \d+ tok", text)) == 1  # "hello" was answered
