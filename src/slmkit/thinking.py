"""Reasoning models (Phi-4-reasoning, Phi-4-mini-reasoning, DeepSeek-R1 style) think in
``<think>…</think>`` before they answer. A chat answer that opens with ``<think>`` has that block
moved out of ``text`` into ``reasoning`` (results and stream chunks alike); the tokens, usage and
max_tokens still count both. An answer that does not open with ``<think>`` is left as it is (a
stream holds back at most the few characters that could still begin the tag).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

OPEN, CLOSE = "<think>", "</think>"


class Splitter:
    """Feed the answer's text piece by piece; each feed returns (reasoning, content) to emit now."""

    def __init__(self) -> None:
        self.state = "start"  # start -> (think -> gap -> answer) | answer
        self.held = ""
        self.opened = False  # the answer opened a think block

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        if self.state == "start":
            lead = self.held.lstrip()
            if not lead or (len(lead) < len(OPEN) and OPEN.startswith(lead)):
                return "", ""  # could still open a think block
            if not lead.startswith(OPEN):
                self.state, out, self.held = "answer", self.held, ""
                return "", out
            self.state, self.held, self.opened = "think", lead[len(OPEN):], True
        if self.state == "think":
            at = self.held.find(CLOSE)
            if at < 0:  # emit all but a tail that could begin the closing tag
                keep = next((k for k in range(min(len(CLOSE) - 1, len(self.held)), 0, -1)
                             if CLOSE.startswith(self.held[-k:])), 0)
                out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return out, ""
            thought, self.held = self.held[:at], self.held[at + len(CLOSE):]
            self.state = "gap"
            return thought, self._after()
        return "", self._after()

    def _after(self) -> str:
        """The answer after the block, without the blank lines that separate them."""
        if self.state == "gap":
            self.held = self.held.lstrip()
            if not self.held:
                return ""
            self.state = "answer"
        out, self.held = self.held, ""
        return out

    def flush(self) -> tuple[str, str]:
        """What is held at the end: an unclosed think block stays reasoning (cut off by max_tokens)."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "think" else ("", held)


def split(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole answer."""
    s = Splitter()
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return (r1 + r2 if s.opened else None), c1 + c2


def apply(result: Any) -> Any:
    """A GenerationResult with its think block moved into result.reasoning."""
    reasoning, text = split(result.text)
    if reasoning is not None:
        result.reasoning, result.text = reasoning, text
    return result


def stream(chunks: Iterator[Any]) -> Iterator[Any]:
    """Chunks whose think-block text goes to chunk.reasoning and the rest to chunk.text."""
    s = Splitter()
    for c in chunks:
        r, t = s.feed(c.text)
        if c.finish_reason is not None:
            r2, t2 = s.flush()
            r, t = r + r2, t + t2
        c.text = t
        if r:
            c.reasoning = r
        yield c
