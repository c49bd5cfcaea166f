"""`slm run --image / --video / --num-crops` and the chat's /image, on tiny text and vision folders."""
from __future__ import annotations

import io
import re

import pytest

import slmkit
from slmkit.cli import main, repl
from slmkit.cli_repl import HELP as HELP_REPL


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


# ------------------------------------------------------------------ a tiny vision folder
@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3v_folder

    return make_phi3v_folder(tmp_path_factory.mktemp("cli_vision"))


@pytest.fixture(scope="module")
def vision_llm(vision_folder):
    return slmkit.load(vision_folder, dtype="float32")


def _user(parts, text):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_run_with_two_images_equals_chat_with_image_parts(vision_folder, vision_llm, tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.jpg", (30, 70), (20, 20, 220))
    rc = main(["run", str(vision_folder), "--image", a, "--image", b, "Compare these", "--max-tokens", "8",
               "--temperature", "0", "--dtype", "float32", "--verbose"])
    out, err = capsys.readouterr()
    expected = vision_llm.chat(_user([_part(a), _part(b)], "Compare these"), max_new_tokens=8, temperature=0)
    assert rc == 0 and out == expected.text + "\n"
    assert f"[prompt {expected.usage.prompt_tokens} tok" in err and expected.usage.prompt_tokens > 2 * 300
    rc = main(["run", str(vision_folder), "--image", a, "Describe", "--num-crops", "1", "--max-tokens", "8",
               "--temperature", "0", "--dtype", "float32", "--verbose"])
    out, err = capsys.readouterr()
    one = vision_llm.chat(_user([_part(a)], "Describe"), max_new_tokens=8, temperature=0, num_crops=1)
    assert rc == 0 and out == one.text + "\n" and f"[prompt {one.usage.prompt_tokens} tok" in err


def test_run_with_a_video_takes_evenly_spaced_frames_at_four_crops(vision_folder, vision_llm, tmp_path, capsys):
    import base64
    import io as _io

    from slmkit.vision import video_frames
    from tests.vision.test_video import write_video

    clip = str(write_video(tmp_path / "clip.mp4", "libx264", frames=12))
    rc = main(["run", str(vision_folder), "--video", clip, "--frames", "3", "What happens?", "--max-tokens", "6",
               "--temperature", "0", "--dtype", "float32", "--verbose"])
    out, err = capsys.readouterr()

    def data_url(img):
        buf = _io.BytesIO()
        img.save(buf, format="PNG")  # lossless: the same pixels whatever the encoder's settings
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    parts = [_part(data_url(f)) for f in video_frames(clip, 3)]
    expected = vision_llm.chat(_user(parts, "What happens?"), max_new_tokens=6, temperature=0, num_crops=4)
    assert rc == 0 and out == expected.text + "\n" and f"[prompt {expected.usage.prompt_tokens} tok" in err
    processed = vision_llm.processor("<|image_1|><|image_2|><|image_3|>", images=video_frames(clip, 3), num_crops=4)
    assert processed.pixel_values.shape[:2] == (3, 5)


def test_repl_image_attaches_to_the_next_message_only(vision_llm, tmp_path):
    a = _png(tmp_path / "a.png")
    lines = iter([f"/image '{a}'", "Describe it", "And now?", "/bye"])
    out, err = io.StringIO(), io.StringIO()
    repl(vision_llm, dict(max_new_tokens=4, temperature=0), None, read=lambda _p: next(lines), out=out, err=err,
         verbose=True)
    first = vision_llm.chat(_user([_part(a)], "Describe it"), max_new_tokens=4, temperature=0)
    assert "image 1 attached" in err.getvalue()
    assert out.getvalue().split("\n")[0] == first.text
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tok", err.getvalue())]
    plain = vision_llm.chat([{"role": "user", "content": "Describe it"}], max_new_tokens=4, temperature=0)
    assert prompts[0] == first.usage.prompt_tokens > plain.usage.prompt_tokens + 300
    assert prompts[1] > prompts[0]  # the second turn carries the first (its image included), no new image


def test_a_bad_image_file_is_one_error_line(vision_folder, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    rc = main(["run", str(vision_folder), "--image", str(bad), "Describe"])
    _, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: ") and "broken.png" in err and err.count("\n") == 1
