"""Chat sessions that keep the KV cache across turns.

    chat = llm.session(system="Be brief.", max_new_tokens=200)
    print(chat.send("What is a GGUF file?").text)
    for chunk in chat.send("And safetensors?", stream=True):
        print(chunk.text, end="")
    chat.rewind_to(1)            # keep only the first message; the cache keeps what still matches
    chat.messages[1]["content"] = "an edited question"   # edits are fine too: the next send()
                                                          # re-renders and reuses the common prefix

Each send() renders the whole conversation with the model's template, as a stateless call would,
so the tokens (and, greedy, the answers) are exactly those of re-sending the history; only the
prefill differs: the tokens after the longest common prefix with the previous turn.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .checks import check_int


class ChatSession:
    def __init__(self, llm: Any, system: str | None = None, **defaults: Any):
        self.llm = llm
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.defaults = defaults
        # the backend's state of this conversation (None: the backend keeps none, each turn prefills all)
        self._state = llm.backend.new_session() if llm.backend.capabilities.sessions else None

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation the session holds (prompt and answers so far)."""
        return self._state.cached_tokens if self._state is not None else 0

    @property
    def last_prefill(self) -> int:
        """How many tokens the last send() had to run through the model before generating."""
        return self._state.last_prefill if self._state is not None else 0

    def rewind_to(self, n: int) -> None:
        """Keep the first n messages (the next send() reuses the cache as far as it still matches)."""
        check_int(n, "n", lo=0, hi=len(self.messages), what=f"an integer in [0, {len(self.messages)}]")
        del self.messages[n:]

    def prime(self, **options: Any) -> None:
        """Run the conversation so far through the model once (one greedy token, discarded), so that
        the next send() prefills only its new message: a restored conversation gets its KV cache
        back. options: num_crops for images. A backend that keeps no state has nothing to do."""
        if self._state is None or not self.messages:
            return
        prompt = self.llm.chat_prompt(self.messages, num_crops=options.get("num_crops"))
        self.llm.generate(prompt, session=self._state, max_new_tokens=1, temperature=0)

    def send(self, content: Any, *, stream: bool = False, **options: Any) -> Any:
        """Add a user message (a string or OpenAI content parts) and answer it; the answer joins
        self.messages. Options as for LLM.generate, over the session's defaults."""
        self.messages.append({"role": "user", "content": content})
        try:
            opts = {**self.defaults, **options}
            if not self.llm.capabilities.token_ids:  # a chat API keeps no state: the history goes each turn
                out = self.llm.chat(self.messages, stream=stream, **opts)
            else:
                prompt = self.llm.chat_prompt(self.messages, num_crops=opts.pop("num_crops", None))
                out = self.llm.generate(prompt, stream=stream, session=self._state, **opts)
        except BaseException:
            self.messages.pop()
            raise
        if not stream:
            self.messages.append({"role": "assistant", "content": out.text})
            return out
        return self._collect(out)

    def _collect(self, chunks: Iterator[Any]) -> Iterator[Any]:
        text: list[str] = []
        try:
            for chunk in chunks:
                text.append(chunk.text)
                yield chunk
        finally:  # a stream stopped early still keeps what was said
            self.messages.append({"role": "assistant", "content": "".join(text)})
