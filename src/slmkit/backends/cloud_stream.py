"""An OpenAI-format stream (chat.completion.chunk / text_completion chunks, spec A6) as TextSteps:
content pieces as they come; tool-call deltas joined by index; the finish held until the stream
ends, so the last step carries the finish reason, the usage-only chunk's counts and the parsed
slmkit.tools.ToolCalls."""
from __future__ import annotations

import json
from typing import Any

from ..errors import ProviderError
from ..results import TokenLogprob
from .base import TextStep


def _logprobs(lp: Any) -> list[TokenLogprob] | None:
    """TokenLogprobs of a choice's logprobs.content (token_id -1: the provider's ids are not ours)."""
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    return [TokenLogprob(t.token, -1, t.logprob, [TokenLogprob(a.token, -1, a.logprob) for a in t.top_logprobs or []])
            for t in content]


class Collector:
    def __init__(self, provider: str, chat: bool = True):
        self.provider, self.chat = provider, chat
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.calls: dict[int, dict[str, Any]] = {}

    def feed(self, chunk: Any) -> TextStep | None:
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        if not self.chat:
            text = choice.text or ""
            return TextStep(text) if text else None
        delta = choice.delta
        for tc in getattr(delta, "tool_calls", None) or []:
            call = self.calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
        text = delta.content or ""
        lps = _logprobs(choice.logprobs)
        return TextStep(text, logprobs=lps) if text or lps else None

    def finish(self) -> TextStep:
        calls = [self._tool_call(i, c) for i, c in sorted(self.calls.items())] or None
        reason = self.finish_reason or "stop"
        if calls:
            reason = "tool_calls"
        u = self.usage
        return TextStep("", finish_reason=reason, prompt_tokens=getattr(u, "prompt_tokens", None),
                        completion_tokens=getattr(u, "completion_tokens", None), tool_calls=calls)

    def _tool_call(self, index: int, c: dict[str, Any]) -> Any:
        from ..tools import ToolCall

        try:
            args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
        except ValueError:
            raise ProviderError(self.provider, f"tool call {index} ({c['name']!r}) has arguments that are not "
                                f"JSON: {c['arguments'][:200]!r}") from None
        if not isinstance(args, dict):
            raise ProviderError(self.provider, f"tool call {index} ({c['name']!r}) has arguments that are not "
                                "a JSON object")
        return ToolCall(c["id"] or f"call_{index}", c["name"], args)
