"""The text-level seam (capabilities.token_ids False: clouds, a running Ollama) with a scripted
backend: results and chunks of the same types as the native path, stop strings matched here when
the backend takes none, n as one call per answer, every other unsupported option refused by name."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from slmkit.api import LLM
from slmkit.backends.base import BackendStats, Capabilities, ModelDescription, TextStep
from slmkit.backends.registry import split_spec
from slmkit.errors import InvalidRequestError, UnsupportedByBackendError


class Scripted:
    """Answers every chat with `reply` in 3-character pieces; records what it was sent."""

    name, model_type, context_length, vocab_size, tokenizer = "scripted", "phi3", 4096, 0, None

    def __init__(self, reply: str = "Hello there. STOP and more", options: frozenset[str] | None = None):
        self.reply, self.sent = reply, []
        self.capabilities = Capabilities(token_ids=False, completion=True, backend="scripted",
                                         options=options if options is not None else frozenset(
                                             {"max_new_tokens", "temperature", "seed"}))

    def stream_chat(self, messages, options, *, tools=None, tool_choice=None, num_crops=None) -> Iterator[TextStep]:
        self.sent.append((messages, options))
        yield from self._pieces(options)

    def stream_completion(self, prompt, options) -> Iterator[TextStep]:
        self.sent.append((prompt, options))
        yield from self._pieces(options)

    def _pieces(self, options):
        text = self.reply[: options.max_new_tokens or None]
        for i in range(0, len(text), 3):
            yield TextStep(text[i:i + 3])
        yield TextStep("", finish_reason="length" if len(text) < len(self.reply) else "stop", prompt_tokens=7,
                       completion_tokens=len(text) // 3)

    def describe(self):
        return ModelDescription(model_type="phi3", context_length=4096)

    def stats(self):
        return BackendStats()

    def close(self):
        pass


def test_chat_results_and_stream():
    llm = LLM(Scripted())
    r = llm.chat([{"role": "user", "content": "hi"}])
    assert r.text == "Hello there. STOP and more" and r.finish_reason == "stop" and r.token_ids == []
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 8
    chunks = list(llm.chat([{"role": "user", "content": "hi"}], stream=True, max_new_tokens=10))
    assert "".join(c.text for c in chunks) == "Hello ther" and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_strings_are_matched_here_when_the_backend_takes_none():
    b = Scripted()
    r = LLM(b).chat([{"role": "user", "content": "hi"}], stop=[" STOP"])
    assert r.text == "Hello there." and r.finish_reason == "stop"
    assert b.sent[-1][1].stop == ()  # not sent to a backend that does not take them


def test_unsupported_options_are_refused_by_name():
    llm = LLM(Scripted())
    for kw in ({"top_k": 5}, {"repetition_penalty": 1.2}, {"logprobs": True}, {"json_schema": {"type": "object"}}):
        with pytest.raises(UnsupportedByBackendError) as e:
            llm.chat([{"role": "user", "content": "hi"}], **kw)
        assert e.value.param == next(iter(kw)) and "scripted" in str(e.value)
    with pytest.raises(UnsupportedByBackendError, match="token ids"):
        llm.generate([1, 2, 3])
    with pytest.raises(UnsupportedByBackendError, match="tools"):
        llm.chat([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(UnsupportedByBackendError, match="images"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]}])
    with pytest.raises(InvalidRequestError):
        llm.logits([1, 2])


def test_n_runs_one_call_per_answer_with_seeds():
    b = Scripted()
    out = LLM(b).chat([{"role": "user", "content": "hi"}], n=3, seed=10)
    assert len(out) == 3 and [o[1].seed for o in b.sent] == [10, 11, 12]


def test_completion_and_session():
    b = Scripted()
    llm = LLM(b)
    assert llm.generate("Once", max_new_tokens=5).text == "Hello"
    chat = llm.session(system="be brief")
    chat.send("hi")
    chat.send("again")
    sent = b.sent[-1][0]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]  # the history goes each turn
    assert llm.prompt_style == "chat"


def test_model_strings():
    assert split_spec("github:microsoft/Phi-3.5-mini-instruct") == ("github", "microsoft/Phi-3.5-mini-instruct")
    assert split_spec("ollama+http://localhost:11434/phi3.5") == ("ollama+http", "http://localhost:11434/phi3.5")
    assert split_spec("OpenAI:phi@http://x/v1") == ("openai", "phi@http://x/v1")
    for native in ("builtin", "./folder", "/abs/x.gguf", "ollama:phi3.5", "C:/models/x", "microsoft/Phi-3-mini"):
        assert split_spec(native) == (None, native)
    with pytest.raises(InvalidRequestError, match="github:microsoft"):
        split_spec("github:")
