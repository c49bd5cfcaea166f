"""ollama+http://host:port/NAME through the official `ollama` client, against our own Ollama API
(`slm serve`'s app on a socket): greedy (and seeded) answers equal the native engine's for the same
messages, streaming, completion, options mapped, structured output, tools, images, and failures as
typed ProviderErrors."""
from __future__ import annotations

import base64
import io
import json

import pytest

import slmkit
from slmkit.backends.ollama_http import MAPPED, ollama_options
from slmkit.cli import main
from slmkit.errors import InvalidRequestError, ProviderError, ProviderUnreachableError, UnsupportedByBackendError
from slmkit.options import GenerationOptions
from tests.helpers.serving import free_port, start_server, stop_server
from tests.helpers.tiny_models import make_phi3v_folder

pytest.importorskip("ollama")
pytest.importorskip("fastapi")

MSGS = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def served(phi3_folders):
    from slmkit.server.app import create_app

    native = slmkit.load(phi3_folders("gqa"), dtype="float32")
    base, srv, t = start_server(create_app({"tiny": native}))
    remote = slmkit.load(f"ollama+{base}/tiny")
    yield native, remote, base
    remote.close()
    stop_server(srv, t)


def test_greedy_chat_equals_native(served):
    native, remote, _ = served
    want = native.chat(MSGS, max_new_tokens=16, temperature=0, ignore_eos=False)
    got = remote.chat(MSGS, max_new_tokens=16, temperature=0)
    assert got.text == want.text and got.token_ids == []
    assert got.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.usage.completion_tokens == want.usage.completion_tokens
    chunks = list(remote.chat(MSGS, max_new_tokens=16, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == want.text and chunks[-1].finish_reason == want.finish_reason
    assert len(chunks) > 2  # really streamed, not one block


def test_sampling_options_and_stop_are_sent(served):
    native, remote, _ = served
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.9, seed=7, repetition_penalty=1.2)
    assert remote.chat(MSGS, **kw).text == native.chat(MSGS, **kw).text
    full = native.chat(MSGS, max_new_tokens=12, temperature=0).text
    stop = full[3:6]
    assert stop and remote.chat(MSGS, max_new_tokens=12, temperature=0, stop=[stop]).text == \
        native.chat(MSGS, max_new_tokens=12, temperature=0, stop=[stop]).text
    for name in ("logprobs", "num_beams", "ignore_eos", "no_repeat_ngram_size"):
        with pytest.raises(UnsupportedByBackendError) as e:
            remote.chat(MSGS, **{name: 2 if name != "logprobs" and name != "ignore_eos" else True})
        assert e.value.param == name and "ollama+http" in str(e.value)


def test_options_mapping_is_what_capabilities_say():
    o = GenerationOptions.from_kwargs(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.8, min_p=0.1,
                                      typical_p=0.9, seed=1, stop=["x"], repetition_penalty=1.1,
                                      repetition_window=8, presence_penalty=0.5, frequency_penalty=0.25,
                                      max_length=512)
    assert ollama_options(o) == {"num_predict": 5, "temperature": 0.5, "top_k": 3, "top_p": 0.8, "min_p": 0.1,
                                 "typical_p": 0.9, "seed": 1, "stop": ["x"], "repeat_penalty": 1.1,
                                 "repeat_last_n": 8, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                                 "num_ctx": 512}
    assert set(o.changed()) <= MAPPED
    assert ollama_options(GenerationOptions.from_kwargs(max_new_tokens=None)) == {"num_predict": -1}


def test_completion_and_json_schema(served):
    native, remote, _ = served
    assert remote.generate("Once upon a time", max_new_tokens=10, temperature=0).text == \
        native.generate("Once upon a time", max_new_tokens=10, temperature=0).text
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    got = remote.chat(MSGS, max_new_tokens=40, temperature=0, json_schema=schema)
    assert got.text == native.chat(MSGS, max_new_tokens=40, temperature=0, json_schema=schema).text
    assert isinstance(json.loads(got.text)["a"], bool)


def test_tools_are_sent(served):
    native, remote, _ = served
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {}}}}]
    assert remote.capabilities.tools
    msgs = [{"role": "user", "content": "Hi"}]  # the tiny model's context is 256 tokens; the tools take most
    want = native.chat(msgs, tools=tools, max_new_tokens=8, temperature=0)
    got = remote.chat(msgs, tools=tools, max_new_tokens=8, temperature=0)
    assert want.tool_calls or want.text != native.chat(msgs, max_new_tokens=8, temperature=0).text  # tools matter
    assert got.text == want.text and bool(got.tool_calls) == bool(want.tool_calls)
    if want.tool_calls:
        assert [(c.name, c.arguments) for c in got.tool_calls] == [(c.name, c.arguments) for c in want.tool_calls]
    with pytest.raises(UnsupportedByBackendError, match="tool_choice"):
        remote.chat(MSGS, tools=tools, tool_choice="required")


def test_text_model_refuses_images_before_sending(served):
    _, remote, _ = served
    assert not remote.capabilities.images
    with pytest.raises(UnsupportedByBackendError, match="images"):
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
        remote.chat([{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}])


def test_images_go_as_base64_to_a_vision_model(tmp_path, capsys):
    from PIL import Image

    from slmkit.server.app import create_app

    native = slmkit.load(make_phi3v_folder(tmp_path / "v"), dtype="float32")
    base, srv, t = start_server(create_app({"vis": native}))
    try:
        remote = slmkit.load(f"ollama+{base}/vis")
        assert remote.capabilities.images
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is shown?"}]}]
        want = native.chat(msgs, max_new_tokens=8, temperature=0)
        got = remote.chat(msgs, max_new_tokens=8, temperature=0)
        assert got.text == want.text and got.usage.prompt_tokens == want.usage.prompt_tokens
        path = tmp_path / "x.png"
        path.write_bytes(buf.getvalue())  # a file path is read here and sent as base64 too
        msgs[0]["content"][0]["image_url"]["url"] = str(path)
        assert remote.chat(msgs, max_new_tokens=8, temperature=0).text == want.text
        remote.close()
        capsys.readouterr()  # the README's command: slm run ollama+http://... --image
        assert main(["run", f"ollama+{base}/vis", "What is shown?", "--image", str(path), "--max-tokens", "8",
                     "--temperature", "0"]) == 0
        assert capsys.readouterr().out.strip() == want.text.strip()
    finally:
        stop_server(srv, t)


def test_failures_are_typed(served):
    _, _, base = served
    with pytest.raises(ProviderError, match="nosuch") as e:
        slmkit.load(f"ollama+{base}/nosuch")
    assert e.value.status == 404
    with pytest.raises(ProviderUnreachableError):
        slmkit.load(f"ollama+http://127.0.0.1:{free_port()}/tiny", timeout=5)
    with pytest.raises(InvalidRequestError, match="ollama\\+http://HOST"):
        slmkit.load("ollama+http://127.0.0.1:1/")
    with pytest.raises(InvalidRequestError, match="bogus"):
        slmkit.load(f"ollama+{base}/tiny", bogus=1)


def test_server_error_message_reaches_the_caller(served):
    _, remote, _ = served
    with pytest.raises(ProviderError) as e:  # num_ctx below the prompt: the server refuses it
        remote.chat(MSGS, max_length=4)
    assert e.value.status is not None and 400 <= e.value.status < 500 and "4" in str(e.value)
