"""Every generation knob, defined once (GenerationOptions) and checked once (its validate()).

The Python API (LLM.generate / chat keyword arguments), the OpenAI and Ollama request bodies
(server/openai_api.options, server/ollama_api.options), the CLI flags (cli.generation_kwargs) and
the step-by-step GeneratorParams all map onto this one type; backends receive it validated. A leaf
module: it imports only the errors and the number checks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .checks import check_int, check_number, shown
from .errors import InvalidRequestError

DEFAULT_MAX_NEW_TOKENS = 512  # LLM.generate / chat, the servers and the CLI's chat mode
MAX_CHOICES = 64  # n: independent samples of one request
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
# A temperature below this is greedy decoding (vLLM's rule, its _SAMPLING_EPS): dividing logits by
# 1e-45 overflows float32 to inf and the softmax to NaN, and the limit of sampling is argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass
class GenerationOptions:
    """One request's decoding options. engine/processors.py has the exact semantics of each knob.

    temperature / top_p / top_k None mean "the model's generation_config where it samples, else
    greedy" (resolved by the backend, which knows the model's defaults)."""
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # None: until max_length / the context
    max_length: int | None = None  # prompt + generated tokens (Ollama's num_ctx); default: the context
    temperature: float | None = None  # 0 = greedy (so is anything below GREEDY_BELOW)
    top_k: int | None = None  # 0 = off
    top_p: float | None = None  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings (the text ends before them)
    stop_token_ids: Sequence[int] = ()  # added to the model's end-of-sequence ids
    ignore_eos: bool = False  # run to the length limit (benchmarks, parity tests)
    repetition_penalty: float = 1.0  # 1 = off (transformers / ORT GenAI semantics)
    repetition_window: int = 0  # penalise the last N tokens only; 0 = the whole sequence
    presence_penalty: float = 0.0  # OpenAI semantics, over the generated tokens
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: Mapping[Any, float] | None = None  # token id (or, in LLM calls, a text) -> added to its logit
    min_new_tokens: int = 0  # no end-of-sequence before this many new tokens
    min_length: int = 0  # ... or before the sequence (prompt + new) is this long (ORT GenAI)
    scorers: Sequence[Callable[..., Any]] = ()  # (input_ids [B, S], logits [B, V]) -> logits
    logprobs: bool = False  # report the chosen token's log-probability per step
    top_logprobs: int = 0  # ... and this many alternatives (0-20)
    return_routing: bool = False  # MoE models: per token, each layer's chosen experts and weights
    # structured output (at most one): a JSON schema, a regex, a Lark / GBNF grammar, or OpenAI's
    # response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}})
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    response_format: dict | None = None
    n: int = 1  # independent samples (sample i uses seed + i)
    # search options (transformers' beam search): num_beams > 1 searches instead of sampling
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, **kw: Any) -> GenerationOptions:
        """Options from keyword arguments (see update())."""
        return cls().update(**kw)

    def update(self, **kw: Any) -> GenerationOptions:
        """A validated copy with these keyword options over this one's. None keeps the value, except
        for max_new_tokens, where None means "no limit but the context"; an unknown name is an
        error that lists the known ones."""
        known = option_names()
        for name in kw:
            if name not in known:
                raise InvalidRequestError(f"unknown generation option {name!r} (known: {', '.join(known)})",
                                          param=name)
        changes = {k: v for k, v in kw.items() if v is not None or k == "max_new_tokens"}
        return dataclasses.replace(self, **changes) if changes else self

    def replace(self, **changes: Any) -> GenerationOptions:
        """A validated copy with these fields set as given (None included)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> list[str]:
        """The options set to something other than their defaults (what a backend must honour)."""
        return [f.name for f in dataclasses.fields(self)
                if not f.name.startswith("_") and getattr(self, f.name) != _DEFAULTS[f.name]]

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs or self.top_logprobs)

    @property
    def structured(self) -> bool:
        return any(v is not None for v in (self.json_schema, self.regex, self.grammar, self.response_format))

    def validate(self) -> None:
        """Every check, each naming its option; normalises what has one meaning in two spellings
        (a lone stop string, a lone scorer, a tiny temperature)."""
        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None:
                check_int(v, name, lo=1, what="a positive integer or None")
        if self.temperature is not None:
            check_number(self.temperature, "temperature", lo=0, hi=100)
            if self.temperature < GREEDY_BELOW:
                self.temperature = 0.0
        if self.top_k is not None:
            check_int(self.top_k, "top_k", lo=0)
        if self.top_p is not None:
            check_number(self.top_p, "top_p", lo=0, hi=1, lo_open=True)
        check_number(self.min_p, "min_p", lo=0, hi=1)
        check_number(self.typical_p, "typical_p", lo=0, hi=1, lo_open=True)
        check_number(self.presence_penalty, "presence_penalty", lo=-2, hi=2)
        check_number(self.frequency_penalty, "frequency_penalty", lo=-2, hi=2)
        check_number(self.repetition_penalty, "repetition_penalty", lo=0, hi=100, lo_open=True)
        if self.seed is not None:
            check_int(self.seed, "seed", lo=0, hi=2**63 - 1, what="an integer in [0, 2**63) or None")
        for name in ("repetition_window", "no_repeat_ngram_size", "min_new_tokens", "min_length"):
            check_int(getattr(self, name), name, lo=0)
        check_int(self.top_logprobs, "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        for name in ("logprobs", "ignore_eos", "return_routing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"must be true or false, got {shown(getattr(self, name))}", param=name)
        self.stop = _stop_strings(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_token_ids):
            raise InvalidRequestError(f"must be a list of non-negative integer token ids, got "
                                      f"{shown(self.stop_token_ids)}", param="stop_token_ids")
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)
        if callable(self.scorers):
            self.scorers = (self.scorers,)
        if not isinstance(self.scorers, (list, tuple)) or not all(callable(f) for f in self.scorers):
            raise InvalidRequestError(f"must be a list of callables (input_ids, logits) -> logits, got "
                                      f"{shown(self.scorers)}", param="scorers")
        check_int(self.n, "n", lo=1, hi=MAX_CHOICES)
        self._validate_search()

    def _validate_search(self) -> None:
        check_search(self.num_beams, self.num_return_sequences, self.length_penalty, self.early_stopping)


def check_search(num_beams: Any, num_return_sequences: Any, length_penalty: Any, early_stopping: Any) -> None:
    """The search options' rule (beam search here and in engine/beam.py), each error naming its option."""
    beams = check_int(num_beams, "num_beams", lo=1)
    returned = check_int(num_return_sequences, "num_return_sequences", lo=1)
    if returned > beams:
        raise InvalidRequestError(f"must be <= num_beams ({beams}), got {returned}", param="num_return_sequences")
    check_number(length_penalty, "length_penalty", what="a number")
    if early_stopping not in (True, False, "never"):
        raise InvalidRequestError(f"must be true, false or 'never', got {shown(early_stopping)}",
                                  param="early_stopping")


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(GenerationOptions))


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """A stop string or a list of them (empty ones dropped: they would stop at once)."""
    if stop is None:
        return ()
    if not isinstance(stop, (str, list, tuple)):
        raise InvalidRequestError(f"must be a string or a list of strings, got {type(stop).__name__}", param="stop")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("must be a string or a list of strings", param="stop")
    return tuple(s for s in stops if s)


def _check_logit_bias(bias: Any) -> None:
    """{token id (or, before LLM resolves it, a text): bias in [-100, 100]} (OpenAI's bound)."""
    if not isinstance(bias, Mapping):
        raise InvalidRequestError(f"must map token ids or strings to numbers, got {type(bias).__name__}",
                                  param="logit_bias")
    for key, value in bias.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, int) and key < 0):
            raise InvalidRequestError(f"keys must be token ids or strings, got {shown(key)}", param="logit_bias")
        check_number(value, "logit_bias", lo=-100, hi=100, what="a map of token ids to numbers in [-100, 100]")


def renamed(error: InvalidRequestError, names: Mapping[str, str]) -> InvalidRequestError:
    """The same error naming the request's own field (max_tokens, options.num_predict) instead of
    the option it maps to."""
    if error.param is None or error.param not in names:
        return error
    message = str(error).removeprefix(f"{error.param}: ")
    return type(error)(message, param=names[error.param])


def options_from(fields: Mapping[str, Any], names: Mapping[str, str] | None = None) -> GenerationOptions:
    """GenerationOptions from a request body's mapped fields; errors name the body's field
    (names: option -> field)."""
    try:
        return GenerationOptions.from_kwargs(**fields)
    except InvalidRequestError as e:
        raise renamed(e, names or {}) from None
