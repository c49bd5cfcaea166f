"""The clouds behind one OpenAI-format client (the official openai SDK: retries with backoff on
408/409/429/5xx honouring retry-after, connect/read timeouts, SSE streaming, custom headers):

    github:microsoft/Phi-3.5-mini-instruct   https://models.github.ai/inference, bearer GITHUB_TOKEN
    azure:Phi-3.5-vision-instruct            AZURE_AI_ENDPOINT's OpenAI v1 route, api-key AZURE_AI_API_KEY
    nim:microsoft/phi-3.5-vision-instruct    https://integrate.api.nvidia.com/v1, bearer NVIDIA_API_KEY
    openai:MODEL@http://host:port/v1         any OpenAI-compatible server (slm serve too), OPENAI_API_KEY

A text-level backend (capabilities.token_ids False): messages go as they are; the answer comes back
as TextSteps. capabilities.options lists exactly the GenerationOptions sent (max_new_tokens as
max_tokens, json_schema as response_format, ...); LLM refuses every other one by name. What each
provider takes follows its documentation (spec A1-A3, A6): Phi models on the three clouds take no
tools, logprobs or structured output; GitHub's free tier caps a request at 8000 input tokens
(estimated here, cloud_media.estimate_tokens) and 4000 output tokens, checked before sending.
Options of open(): api_key, base_url, timeout (read, s), connect_timeout, max_retries,
max_input_tokens / max_output_tokens (GitHub; 0: no check), assets_url (NIM), sdk (azure:
"azure-ai-inference", the retired SDK, backends/cloud_azure_sdk.py).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import check_int, check_number
from ..errors import BackendUnavailableError, ContextLengthError, InvalidRequestError, ProviderAuthError
from ..options import GenerationOptions
from .base import BackendStats, Capabilities, ModelDescription, TextStep
from .cloud_keys import find_key, from_keys_file, translate
from .cloud_media import NvcfAssets, estimate_tokens, wire_messages

SAMPLING = frozenset({"max_new_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                      "frequency_penalty"})
STRUCTURED = frozenset({"json_schema", "response_format"})
LOGPROBS = frozenset({"logprobs", "top_logprobs"})
NVCF_ASSETS = "https://api.nvcf.nvidia.com/v2/nvcf/assets"
GITHUB_API_VERSION = "2022-11-28"


@dataclass(frozen=True)
class Preset:
    base_url: str | None
    key_env: tuple[str, ...]
    key_required: bool = True
    azure_key_header: bool = False  # also send api-key: <key> (Azure, spec A2)
    inline_images: bool = False  # images as <img src="data:..."> in a string content (NIM, spec A3)
    documented: frozenset[str] = SAMPLING  # what the provider documents for Phi models
    others: frozenset[str] = SAMPLING  # ... and for the other models it serves
    tools_for_others: bool = False
    all_images: bool = False  # images for every model (a generic server decides itself)
    completion: bool = False  # /completions


PRESETS = {
    "github": Preset("https://models.github.ai/inference", ("GITHUB_TOKEN", "GH_TOKEN"),
                     others=SAMPLING | STRUCTURED, tools_for_others=True),
    "azure": Preset(None, ("AZURE_AI_API_KEY", "AZURE_INFERENCE_CREDENTIAL"), azure_key_header=True),
    "nim": Preset("https://integrate.api.nvidia.com/v1", ("NVIDIA_API_KEY",), inline_images=True),
    "openai": Preset(None, ("OPENAI_API_KEY",), key_required=False, documented=SAMPLING | STRUCTURED | LOGPROBS,
                     others=SAMPLING | STRUCTURED | LOGPROBS, tools_for_others=True, all_images=True,
                     completion=True),
}
_OPENERS = ("api_key", "base_url", "timeout", "connect_timeout", "max_retries", "max_input_tokens",
            "max_output_tokens", "assets_url", "sdk", "dtype", "device")


def model_family(model: str) -> tuple[str, bool, int]:
    """(model_type, takes images, context length) guessed from a Phi model id; ("", False, 131072) else."""
    m = model.lower()
    vision = "vision" in m or "multimodal" in m
    ctx = 4096 if "4k" in m else 8192 if "8k" in m else 131072
    if "phi" not in m:
        return "", False, ctx
    return ("phi3_v" if vision else "phimoe" if "moe" in m else "phi3"), vision, ctx


def _http_url(url: Any) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(f"must be an http(s) URL, got {url!r}", param="base_url")
    return str(url).rstrip("/")


def azure_base_url(endpoint: str) -> str:
    """The OpenAI v1 route of an Azure endpoint (spec A2): a URL already ending in /v1 as it is; an
    Azure OpenAI / Foundry resource (*.openai.azure.com, *.services.ai.azure.com[/models]) ->
    https://host/openai/v1; a serverless deployment (*.models.ai.azure.com) -> endpoint/v1."""
    from urllib.parse import urlsplit

    url = _http_url(endpoint)
    parts = urlsplit(url)
    if url.endswith("/v1"):
        return url
    host = parts.netloc.lower()
    if host.endswith((".openai.azure.com", ".services.ai.azure.com", ".cognitiveservices.azure.com")):
        return f"{parts.scheme}://{parts.netloc}/openai/v1"
    return url + "/v1"


def open(provider: str, target: str, *, api_key: str | None = None, base_url: str | None = None,  # noqa: A001
         timeout: float = 120.0, connect_timeout: float = 10.0, max_retries: int = 2,
         max_input_tokens: int | None = 8000, max_output_tokens: int | None = 4000,
         assets_url: str = NVCF_ASSETS, sdk: str = "openai", dtype: str = "auto", device: str = "cpu",
         **options: Any) -> Any:
    if options:
        name = next(iter(options))
        raise InvalidRequestError(f"unknown option {name!r} for the {provider} backend (known: "
                                  f"{', '.join(_OPENERS)})", param=name)
    for name, given, default in (("dtype", dtype, "auto"), ("device", device, "cpu")):
        if given != default:  # a remote model's dtype and device are the provider's
            raise InvalidRequestError(f"does not apply to the {provider} backend (the provider runs the model)",
                                      param=name)
    for name, seconds in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        check_number(seconds, name, lo=0, hi=3600, lo_open=True, what="seconds in (0, 3600]")
    check_int(max_retries, "max_retries", lo=0, hi=10)
    for name, limit in (("max_input_tokens", max_input_tokens), ("max_output_tokens", max_output_tokens)):
        if limit is not None:
            check_int(limit, name, lo=0, what="a token count (0: not checked)")
    preset = PRESETS[provider]
    model = target
    if provider == "openai":
        model, sep, base_url_in = target.rpartition("@")
        if not sep or not model or not base_url_in:
            raise InvalidRequestError("needs MODEL@BASE_URL, e.g. openai:phi@http://127.0.0.1:8000/v1", param="model")
        base_url = base_url or base_url_in
    elif provider == "github" and "/" not in model and model.lower().startswith("phi"):
        model = f"microsoft/{model}"  # the legacy endpoint's bare names gained the publisher (spec A1)
    if provider == "azure":
        import os

        endpoint = base_url or os.environ.get("AZURE_AI_ENDPOINT") or os.environ.get("AZURE_INFERENCE_ENDPOINT") \
            or from_keys_file("azure", "base_url")
        if not endpoint:
            raise InvalidRequestError("azure needs its endpoint: base_url=... or AZURE_AI_ENDPOINT "
                                      "(https://<resource>.openai.azure.com/openai/v1/ or a serverless "
                                      "https://<deployment>.<region>.models.ai.azure.com)", param="base_url")
        base_url = endpoint if sdk != "openai" else azure_base_url(endpoint)
    key = find_key(provider, api_key, preset.key_env)
    if key is None and preset.key_required:
        raise ProviderAuthError(provider, f"no key: set {' or '.join(preset.key_env)}, pass api_key=..., or put "
                                "it in ~/.config/slmkit/keys.json (mode 0600)")
    if sdk != "openai":
        if provider != "azure" or sdk != "azure-ai-inference":
            raise InvalidRequestError("must be 'openai' (or 'azure-ai-inference' for azure)", param="sdk")
        from .cloud_azure_sdk import AzureSdkBackend

        return AzureSdkBackend(model, str(base_url), key or "", timeout=timeout, connect_timeout=connect_timeout,
                               max_retries=max_retries)
    if provider != "github":
        max_input_tokens = max_output_tokens = None
    # a self-hosted NIM, an org-billed GitHub route, a proxy: base_url= or the keys file's base_url
    base_url = _http_url(base_url or from_keys_file(provider, "base_url") or preset.base_url)
    return CloudBackend(provider, model, str(base_url), key, timeout=timeout,
                        connect_timeout=connect_timeout, max_retries=max_retries, limits=(max_input_tokens,
                        max_output_tokens), assets_url=assets_url)


def _limit(n: int, limit: int, kind: str, what: str, option: str) -> ContextLengthError:
    e = ContextLengthError(n, limit, f"GitHub Models free tier's {kind} limit per request")
    e.args = (f"{e}: shorten {what}, or pass {option}=0 to load() if your plan allows more",)
    return e


class CloudBackend:
    """One model at one OpenAI-format provider."""
    vocab_size = 0
    tokenizer = None

    def __init__(self, provider: str, model: str, base_url: str, key: str | None, *, timeout: float,
                 connect_timeout: float, max_retries: int, limits: tuple[int | None, int | None] = (None, None),
                 assets_url: str = NVCF_ASSETS):
        self.provider, self.model, self.base_url = provider, model, base_url.rstrip("/")
        self.name = f"{provider}:{model}"
        self.preset = preset = PRESETS[provider]
        self.model_type, vision, self.context_length = model_family(model)
        self.limits = limits
        self._secrets = (key or "",)
        self.client = self._client(key, timeout, connect_timeout, max_retries)
        self.assets = NvcfAssets(assets_url, key, timeout, provider) if preset.inline_images else None
        is_phi = self.model_type != ""
        sent = preset.documented if is_phi else preset.others
        tools = preset.tools_for_others and (provider == "openai" or not is_phi)
        self.capabilities = Capabilities(
            images=vision or preset.all_images, token_ids=False, completion=preset.completion, tools=tools,
            structured_output=bool(sent & STRUCTURED), logprobs=bool(sent & LOGPROBS), options=sent,
            backend=provider)
        self.tokens_generated = 0
        self._warned_system = False

    def _client(self, key: str | None, timeout: float, connect_timeout: float, max_retries: int) -> Any:
        try:
            import openai
        except ImportError:
            raise BackendUnavailableError(self.provider, "needs the openai package", extra="cloud") from None
        headers = {"api-key": key} if self.preset.azure_key_header and key else {}
        if self.provider == "github":  # recommended by GitHub's REST docs (spec A1)
            headers["X-GitHub-Api-Version"] = GITHUB_API_VERSION
        # keyless (a local server): no Authorization header at all; the SDK insists on a placeholder key
        self._extra: dict[str, Any] = {} if key else {"Authorization": openai.Omit()}
        if self.provider != "openai":  # an OpenAI organisation / project from the environment is not theirs
            self._extra.update({"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()})
        return openai.OpenAI(api_key=key or "no-key", base_url=self.base_url, max_retries=max_retries,
                             timeout=openai.Timeout(timeout, connect=connect_timeout), default_headers=headers)

    def __repr__(self) -> str:  # never the key
        return f"CloudBackend({self.name!r}, base_url={self.base_url!r})"

    # ------------------------------------------------------------------ the request
    def body(self, options: GenerationOptions) -> dict[str, Any]:
        """The wire fields of validated options (only those capabilities.options allows reach here)."""
        o, out = options, dict[str, Any]()
        if o.max_new_tokens is not None:
            out["max_tokens"] = o.max_new_tokens
        for name in ("temperature", "top_p", "seed"):
            if getattr(o, name) is not None:
                out[name] = getattr(o, name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(o, name):
                out[name] = getattr(o, name)
        if o.stop:
            out["stop"] = list(o.stop)
        if o.json_schema is not None:
            schema = json.loads(o.json_schema) if isinstance(o.json_schema, str) else o.json_schema
            out["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "output", "schema": schema, "strict": True}}
        elif o.response_format is not None:
            out["response_format"] = dict(o.response_format)
        if o.wants_logprobs:
            out["logprobs"] = True
            if o.top_logprobs:
                out["top_logprobs"] = o.top_logprobs
        return out

    def _check_limits(self, messages: list[dict], options: GenerationOptions) -> None:
        max_in, max_out = self.limits  # 0 / None: not checked (a paid plan)
        if max_out and options.max_new_tokens is not None and options.max_new_tokens > max_out:
            raise _limit(options.max_new_tokens, max_out, "output", "max_new_tokens", "max_output_tokens")
        if max_in:
            n = estimate_tokens(messages)
            if n > max_in:
                raise _limit(n, max_in, "input", "the messages (estimated at one token per 4 characters)",
                             "max_input_tokens")

    def _warn_system(self, messages: Sequence[dict]) -> None:
        if self.provider == "azure" and self.model_type and not self._warned_system and any(
                m.get("role") == "system" for m in messages):
            self._warned_system = True
            warnings.warn(f"azure: {self.model} takes no system messages; Azure rewrites them into user messages "
                          "(spec A2)", UserWarning, stacklevel=4)

    def stream_chat(self, messages: Sequence[Any], options: GenerationOptions, *, tools: Any = None,
                    tool_choice: Any = None, num_crops: int | None = None) -> Iterator[TextStep]:
        if num_crops is not None:
            from ..errors import UnsupportedByBackendError

            raise UnsupportedByBackendError("num_crops", self.provider, "the provider crops images itself")
        upload = self.assets.upload if self.assets is not None else None
        wire, assets = wire_messages(list(messages), self.provider, inline_images=self.preset.inline_images,
                                     one_image=self.provider == "azure" and self.model_type == "phi3_v",
                                     upload=upload)
        try:
            self._check_limits(wire, options)
            self._warn_system(wire)
            extra = dict(self._extra)
            if assets:
                extra["NVCF-INPUT-ASSET-REFERENCES"] = extra["NVCF-FUNCTION-ASSET-IDS"] = ",".join(assets)
            body = self.body(options)
            if tools is not None:
                from ..tools import _functions

                _functions(tools)  # the shape checked here, the names by the provider
                body["tools"] = list(tools)
                if tool_choice is not None:
                    body["tool_choice"] = tool_choice
            yield from self._chat(wire, body, extra)
        finally:
            if assets and self.assets is not None:
                self.assets.delete(assets)

    def _chat(self, wire: list[dict], body: dict[str, Any], extra: dict[str, Any]) -> Iterator[TextStep]:
        create: Any = self.client.chat.completions.create  # messages as plain dicts
        return self._run(lambda **kw: create(model=self.model, messages=wire, extra_headers=extra, **body, **kw))

    def stream_completion(self, prompt: str, options: GenerationOptions) -> Iterator[TextStep]:
        body = self.body(options)
        yield from self._run(lambda **kw: self.client.completions.create(
            model=self.model, prompt=prompt, extra_headers=self._extra, **body, **kw), chat=False)

    def _run(self, call: Any, chat: bool = True) -> Iterator[TextStep]:
        """Stream the call's answer as TextSteps; the last carries the finish, usage and tool calls."""
        from .cloud_stream import Collector

        where = self.base_url
        try:
            stream = call(stream=True, stream_options={"include_usage": True})
        except Exception as e:  # noqa: BLE001 -- the SDK's errors become ProviderErrors; others pass as they are
            raise translate(e, self.provider, where, self._secrets) from None
        acc = Collector(self.provider, chat)
        try:
            for chunk in stream:
                step = acc.feed(chunk)
                if step is not None:
                    yield step
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.provider, where, self._secrets) from None
        finally:
            stream.close()
        last = acc.finish()
        self.tokens_generated += last.completion_tokens or 0
        yield last

    # ------------------------------------------------------------------ description
    def describe(self) -> ModelDescription:
        return ModelDescription(model_type=self.model_type or "remote", context_length=self.context_length,
                                format=f"{self.provider} API ({self.base_url})", dtype="remote")

    def stats(self) -> BackendStats:
        return BackendStats(tokens_generated=self.tokens_generated)

    def close(self) -> None:
        self.client.close()


__all__ = ["CloudBackend", "PRESETS", "Preset", "azure_base_url", "model_family", "open"]
