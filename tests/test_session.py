"""Chat sessions keep the KV cache: same tokens as re-sending the history, far less prefill."""
from __future__ import annotations

import pytest

import slmkit
from slmkit import InvalidRequestError

TURNS = ["Hello there!", "What is 2 + 2?", "Tell me a story.", "Shorter, please.", "Thanks, bye."]


@pytest.mark.parametrize("variant", ["gqa", "longrope"])  # longrope: the talk outgrows original_max 32
def test_five_turns_equal_resending_the_history(phi3_folders, variant):
    llm = slmkit.load(phi3_folders(variant), dtype="float32")
    kw = dict(max_new_tokens=10, temperature=0)
    chat = llm.session(system="You are terse.", **kw)
    history = [{"role": "system", "content": "You are terse."}]
    prev = 0  # prompt tokens of the previous turn
    for i, text in enumerate(TURNS):
        got = chat.send(text)
        history.append({"role": "user", "content": text})
        want = llm.chat(history, **kw)
        assert got.token_ids == want.token_ids and got.text == want.text, i
        history.append({"role": "assistant", "content": want.text})
        full = len(llm.tokenizer.encode(llm.render(history[:-1]).text, add_special_tokens=False))
        # the previous prompt is reused at least (a random model's answer may re-tokenize differently)
        assert chat.last_prefill <= full - prev, (i, chat.last_prefill, full, prev)
        assert i == 0 or chat.last_prefill < full
        prev = full
    assert chat.messages == history


def test_rewind_and_edit_reuse_the_common_prefix(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    chat = llm.session(max_new_tokens=8, temperature=0)
    first = chat.send("One question.")
    chat.send("Another one.")
    chat.rewind_to(2)  # back to after the first answer
    again = chat.send("A different second question.")
    assert again.token_ids == llm.chat(chat.messages[:3], max_new_tokens=8, temperature=0).token_ids
    assert chat.last_prefill < chat.cached_tokens - len(again.token_ids) - 5
    chat.messages[0]["content"] = "One edited question."
    chat.rewind_to(1)
    edited = chat.send("Go on.")
    assert edited.token_ids == llm.chat(chat.messages[:2], max_new_tokens=8, temperature=0).token_ids
    assert first.text and chat.messages[-1]["content"] == edited.text


def test_streaming_turn_is_kept_and_errors_leave_no_trace(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    chat = llm.session(max_new_tokens=6, temperature=0)
    text = "".join(c.text for c in chat.send("Stream this.", stream=True))
    assert chat.messages[-1] == {"role": "assistant", "content": text}
    n = len(chat.messages)
    with pytest.raises(InvalidRequestError):
        chat.send("Bad option.", top_p=0)
    assert len(chat.messages) == n
    with pytest.raises(InvalidRequestError):
        chat.rewind_to(99)
