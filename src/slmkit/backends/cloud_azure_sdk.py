"""`azure:MODEL` through the azure-ai-inference SDK (load(..., sdk="azure-ai-inference"); extra
`azure`), for the lesson's notebooks that use ChatCompletionsClient. Microsoft retired that SDK and
the Azure AI Model Inference API on 2026-08-26 (spec A2): endpoints that still answer it get
POST {endpoint}/chat/completions?api-version=2024-05-01-preview with Authorization: Bearer and
api-key headers; everything else should use the default OpenAI v1 route (backends/cloud.py).

Answers come whole (the SDK's stream parser drops the usage-only chunk, so usage would be lost),
as one piece of text then the finish; the request's checks, messages and capabilities are the
azure preset's."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from ..errors import (
    BackendUnavailableError,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitError,
    ProviderTimeoutError,
    ProviderUnreachableError,
)
from .base import TextStep
from .cloud import CloudBackend
from .cloud_keys import scrub

RETIRED = ("the azure-ai-inference SDK and the Azure AI Model Inference API were retired on 2026-08-26; "
           "use the default OpenAI v1 route (slmkit.load('azure:MODEL') without sdk=)")


class AzureSdkBackend(CloudBackend):
    def __init__(self, model: str, endpoint: str, key: str, *, timeout: float, connect_timeout: float,
                 max_retries: int):
        warnings.warn(RETIRED, FutureWarning, stacklevel=3)
        super().__init__("azure", model, endpoint, key, timeout=timeout, connect_timeout=connect_timeout,
                         max_retries=max_retries)

    def _client(self, key: str | None, timeout: float, connect_timeout: float, max_retries: int) -> Any:
        try:
            from azure.ai.inference import ChatCompletionsClient
            from azure.core.credentials import AzureKeyCredential
        except ImportError:
            raise BackendUnavailableError("azure", "sdk='azure-ai-inference' needs that package (retired: "
                                          "prefer the default OpenAI v1 route)", extra="azure") from None
        self._extra = {}
        return ChatCompletionsClient(self.base_url, AzureKeyCredential(key or ""), read_timeout=timeout,
                                     connection_timeout=connect_timeout, retry_total=max_retries)

    def _chat(self, wire: list[dict], body: dict[str, Any], extra: dict[str, Any]) -> Iterator[TextStep]:
        try:
            r = self.client.complete(messages=wire, model=self.model, headers=extra or None, **body)
        except Exception as e:  # noqa: BLE001 -- azure-core's errors become ProviderErrors
            raise self._translate(e) from None
        choice = r.choices[0]
        text = choice.message.content or ""
        if text:
            yield TextStep(text)
        u = r.usage
        self.tokens_generated += getattr(u, "completion_tokens", 0) or 0
        yield TextStep("", finish_reason=str(choice.finish_reason or "stop"),
                       prompt_tokens=getattr(u, "prompt_tokens", None),
                       completion_tokens=getattr(u, "completion_tokens", None))

    def _translate(self, e: Exception) -> Exception:
        from azure.core import exceptions as ax

        def clean(msg: str) -> str:
            return scrub(msg, self._secrets)[:2000]

        if isinstance(e, ax.ServiceResponseTimeoutError | ax.ServiceRequestTimeoutError):
            return ProviderTimeoutError("azure", f"no answer from {self.base_url} in time")
        if isinstance(e, ax.ServiceRequestError | ax.ServiceResponseError):
            return ProviderUnreachableError("azure", clean(f"cannot reach {self.base_url} ({e})"))
        if isinstance(e, ax.HttpResponseError):
            status = e.status_code
            err = getattr(e, "error", None)
            msg = clean(str(getattr(err, "message", None) or e.reason or e.message))
            if status in (401, 403):
                return ProviderAuthError("azure", f"{msg} (check the key)", status=status)
            if status == 429:
                return ProviderRateLimitError("azure", msg, status=status)
            return ProviderError("azure", msg, status=status)
        return e

    def stream_completion(self, prompt: str, options: Any) -> Iterator[TextStep]:
        raise ProviderError("azure", "chat only")

    def close(self) -> None:
        self.client.close()
