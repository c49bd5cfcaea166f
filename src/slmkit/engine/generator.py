"""The step-by-step Generator, in the manner of ONNX Runtime GenAI.

    gen = Generator(llm, GeneratorParams(max_length=256, temperature=0))
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
        print(tok.stream_decode(gen.get_next_tokens()[0]), end="")

The Generator keeps every row's token sequence; the KV cache holds a prefix of it. Whatever is
not yet in the cache is fed on the next forward pass, computed lazily (a token is sampled, then
fed when its logits are first needed). This also makes the LongRoPE crossover exact: when the
sequence crosses original_max_position_embeddings the cache was built with the short factors,
so it is dropped and the whole sequence re-prefilled with the long ones, as transformers does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..checks import check_int
from ..errors import ContextLengthError, InvalidRequestError
from ..models.cache import KVCache
from ..options import GenerationOptions
from .engine import Engine
from .images import ImageEntry
from .processors import LogitsChain
from .sampling import make_sampler
from .speculative import Speculator, Verified, mode_for
from .structured import Constraint, grammar_for

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class GeneratorParams(GenerationOptions):
    """GenerationOptions for the step-by-step Generator, with ONNX Runtime GenAI's defaults: no
    max_new_tokens (the limit is max_length, default the context), greedy unless told otherwise,
    and batch_size rows decoded together. Stop strings and n are LLM.generate's: the Generator
    works on token ids only. num_beams > 1 is accepted here (set_search_options) but runs through
    LLM.generate: the Generator itself refuses it."""
    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0 = greedy (so is anything below GREEDY_BELOW)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    batch_size: int = 1

    @classmethod
    def for_request(cls, options: GenerationOptions, generation_config: dict | None = None) -> GeneratorParams:
        """A request's params: the model's generation_config fills temperature / top_p / top_k where
        the request left them unset (only if it samples); otherwise they are off (greedy)."""
        cfg = generation_config or {}
        sampled = bool(cfg.get("do_sample"))
        given = {f.name: getattr(options, f.name) for f in fields(GenerationOptions)}
        for name, off, cast in (("temperature", 0.0, float), ("top_p", 1.0, float), ("top_k", 0, int)):
            if given[name] is None:
                given[name] = cast(cfg.get(name, 1.0 if name != "top_k" else 0)) if sampled else off
        return cls(**given)

    def set_search_options(self, **options: object) -> None:
        """ORT-GenAI style setter: set_search_options(max_length=..., temperature=..., do_sample=...,
        num_beams=...)."""
        for key, value in options.items():
            if key == "do_sample":
                if not value:
                    self.temperature = 0.0
                elif self.temperature <= 0:
                    self.temperature = 1.0
                continue
            if key not in _FIELDS:
                raise InvalidRequestError(f"unknown search option {key!r}", param=key)
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """GenerationOptions' checks, then what the engine needs on top: concrete sampling
        numbers, token-id keys in logit_bias, a compiled grammar."""
        for name, off in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0)):
            if getattr(self, name) is None:
                setattr(self, name, off)
        super().validate()
        check_int(self.batch_size, "batch_size", lo=1, what="a positive integer")
        if self.logit_bias is not None and any(isinstance(k, str) for k in self.logit_bias):
            raise InvalidRequestError("must map token ids (integers) to numbers", param="logit_bias")
        self._grammar = grammar_for(json_schema=self.json_schema, regex=self.regex, grammar=self.grammar,
                                    response_format=self.response_format)
        if self._grammar is not None and self.batch_size != 1:
            raise InvalidRequestError(f"structured output runs one sequence at a time, got {self.batch_size!r}",
                                      param="batch_size")

    _validate = validate  # the name the engine's callers used


_FIELDS = frozenset(f.name for f in fields(GeneratorParams))


class Generator:
    def __init__(self, model: object, params: GeneratorParams | None = None, *, external_logits: bool = False):
        """external_logits: never run the model; the caller sets each step's logits (set_logits),
        as the continuous-batching engine does for many generators in one forward pass."""
        engine = getattr(model, "engine", model)  # an LLM or a NativeBackend holds its Engine
        if not isinstance(engine, Engine) and not (external_logits and hasattr(engine, "check_prompt_ids")):
            raise InvalidRequestError("Generator needs a locally loaded (native) model", param="model")
        # with external_logits, any object with Engine's descriptive half will do (a LogitsSource:
        # tokenizer, context_length, vocab_size, eos_token_ids, device, check_prompt_ids): another
        # runtime's backend (backends/runtime.py) decodes with the same processors and sampler
        self.engine: Engine = engine  # type: ignore[assignment]  # or a LogitsSource, as said
        self.external = external_logits
        self.params = params or GeneratorParams()
        self._queue: list[Verified] = []  # tokens a speculative step produced, not yet emitted
        self.speculator: Speculator | None = None
        self.caller_verifies = False  # an external_logits caller drafts and verifies (speculate_for_caller)
        self.last_processed: torch.Tensor | None = None  # the last step's processed logits (a draft's q)
        self.configure()
        self.engine.tokenizer.reset_stream()  # tokenizer.stream_decode follows this generation from here on
        self.sequences: list[list[int]] = [[] for _ in range(self.params.batch_size)]
        self.cache: KVCache | None = None
        self.cached_at_prefill = 0  # keys reused by the last prefill (a session's common prefix)
        self.finish_reasons: list[str | None] = [None] * self.params.batch_size
        self._logits: torch.Tensor | None = None  # [B, V] float32, logits for the next token
        self._prompt_len = 0
        self._next: list[int] = []
        self._pending_logprobs: tuple[torch.Tensor, torch.Tensor, int] | None = None  # last_logprobs, not yet computed
        self.last_logprobs = []  # per row, last step
        self.images: dict[int, ImageEntry] = {}  # the images whose tokens (negative ids) the sequences hold

    def configure(self, params: GeneratorParams | None = None) -> None:
        """(Re)apply params: stop set, seeded RNG and grammar. The sequences and KV cache stay, so a
        chat session can change options between turns."""
        self._drop_queue()
        if params is not None:
            if params.batch_size != self.params.batch_size:
                raise InvalidRequestError("batch_size cannot change on a running generator", param="batch_size")
            self.params = params
        engine, p = self.engine, self.params
        if p.num_beams > 1:  # beams need num_beams rows and reordered caches: engine/beam.py runs them
            raise InvalidRequestError(f"is {p.num_beams}: the step-by-step Generator does not run beam search; "
                                      "use LLM.generate(ids, num_beams=...)", param="num_beams")
        self.max_length = min(p.max_length or engine.context_length, engine.context_length)
        self.eos = frozenset() if p.ignore_eos else engine.eos_token_ids | frozenset(p.stop_token_ids)
        self.rng = None if p.seed is None else torch.Generator(device=engine.device).manual_seed(p.seed)
        self.chain = LogitsChain(p)  # the processors and warpers, built once per request
        self.sampler = make_sampler(p.temperature)
        grammar = p._grammar
        self.constraint = None if grammar is None else Constraint(
            grammar[0], grammar[1], engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
        self._consumed: list[tuple[int, int]] = []  # (sequence position, token) the constraint has seen
        self._spec_checked = False  # the drafting mode is chosen at the first step (it needs the prompt)

    @property
    def drafted_tokens(self) -> int:
        return self.speculator.drafted if self.speculator is not None else 0

    @property
    def accepted_tokens(self) -> int:
        return self.speculator.accepted if self.speculator is not None else 0

    def _speculating(self) -> bool:
        """Whether this step drafts (speculative decoding, engine/speculative.py)."""
        if self.caller_verifies:  # its caller plans and verifies the drafts (speculate_for_caller)
            return False
        if not self._spec_checked:
            self._spec_checked = True
            if self.external:  # the caller runs the model: nothing to verify drafts with
                if self.params.speculative in ("ngram", "draft") or self.params.draft is not None:
                    raise InvalidRequestError(f"speculative={self.params.speculative!r} needs the Generator to run "
                                              "the model (not external_logits)", param="speculative")
                return False
            mode = mode_for(self.params, self._prompt_len)
            old = self.speculator
            keep = old is not None and old.mode == mode and (mode != "draft" or (
                old.draft_gen is not None and old.draft_gen.engine is getattr(self.params.draft, "engine",
                                                                              self.params.draft)))
            if mode == "none":
                self.speculator = None
            elif keep and old is not None:
                old.k = self.params.num_draft
            else:
                self.speculator = Speculator(self, mode)
        return self.speculator is not None

    def speculate_for_caller(self) -> Speculator | None:
        """For an external_logits generator whose caller runs the verification passes (the batch
        engine): this request's Speculator, chosen by the Generator's own rule (mode_for), or None
        when it decodes plainly. The caller then plans drafts, verifies them on its logits and hands
        the tokens to queue_verified(). Call after append_tokens (the rule needs the prompt)."""
        mode = mode_for(self.params, self._prompt_len)
        self.caller_verifies, self._spec_checked = True, True
        self.speculator = None if mode == "none" else Speculator(self, mode)
        return self.speculator

    def queue_verified(self, tokens: list[Verified]) -> None:
        """The tokens of the caller's verification pass (Speculator.verify): the next
        generate_next_token() calls emit them one by one, with stops and limits, as the
        Generator's own speculative steps do (set_logits or a rewind drops what is left)."""
        self._queue = list(tokens)

    # ------------------------------------------------------------------ input
    def append_tokens(self, tokens: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> None:
        """Append tokens to every row (a flat list for batch 1, or one equal-length list per row)."""
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple, torch.Tensor)):
            raise InvalidRequestError(f"must be a list of token ids (or one list per row), got {type(tokens).__name__}",
                                      param="tokens")
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = [rows]
        B = self.params.batch_size
        if len(rows) != B:
            raise InvalidRequestError(f"expected {B} rows of tokens for batch_size {B}, got {len(rows)}",
                                      param="tokens")
        if len({len(r) for r in rows}) != 1:
            raise InvalidRequestError("rows of a batch must have the same length", param="tokens")
        rows = [self.engine.check_prompt_ids(r, self.images, "tokens") for r in rows]
        self._drop_queue()
        new_len = len(self.sequences[0]) + len(rows[0])
        if new_len > self.max_length:
            raise ContextLengthError(new_len, self.max_length, "max_length")
        for seq, r in zip(self.sequences, rows):
            seq.extend(r)
        self._prompt_len = len(self.sequences[0])  # max_new_tokens counts from the last append
        full = FINISH_LENGTH if new_len >= self.max_length else None  # no room for another token
        self.finish_reasons = [full] * B
        self._logits = None
        if not self.external:
            self._compute_logits()

    def append_inputs(self, inputs: Any) -> None:
        """Append a multimodal prompt (slmkit.vision.MultimodalInputs: input_ids with -k placeholders,
        pixel_values, image_sizes, num_image_tokens) to every row: append_tokens for images."""
        ids = getattr(inputs, "input_ids", None)
        if ids is None:
            raise InvalidRequestError(f"must be processor output (MultimodalInputs), got {type(inputs).__name__}",
                                      param="inputs")
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids, images = self.engine.attach_images(ids, inputs.pixel_values, inputs.image_sizes,
                                                list(inputs.num_image_tokens or []))
        self.add_images(images)
        self.append_tokens(ids)

    def add_images(self, images: Mapping[int, ImageEntry]) -> None:
        """Make images (engine.attach_images' entries) available to this generator's token ids."""
        self.images.update(images)

    # ------------------------------------------------------------------ stepping
    def _compute_logits(self) -> torch.Tensor:
        if self._logits is not None:
            return self._logits
        self._drop_queue()
        if self.external:
            raise InvalidRequestError("this generator's logits come from its caller: set_logits() first",
                                      param="logits")
        length = len(self.sequences[0])
        if length == 0:
            raise InvalidRequestError("append_tokens() must be called before generating", param="tokens")
        self._ensure_cache(length)
        assert self.cache is not None
        regime = self.engine.rope_regime(length)
        if self.cache.offset and self.cache.tag != regime:
            self.cache.reset()  # keys were rotated with the other LongRoPE factor set: re-prefill
        self.cached_at_prefill = self.cache.offset  # tokens whose keys were already there
        ids = torch.tensor([s[self.cache.offset:] for s in self.sequences], dtype=torch.long,
                           device=self.engine.device)
        self._logits = self.engine.forward(ids, self.cache, images=self.images)[:, -1]
        return self._logits

    def _ensure_cache(self, length: int) -> None:
        if self.cache is None:  # sized for this request; it doubles if a long run outgrows it
            want = min(self.max_length, length + (self.params.max_new_tokens or 128))
            self.cache = self.engine.new_cache(self.params.batch_size, max(want, length))

    def forward_all(self, extra: list[int]) -> torch.Tensor:
        """Logits [n + 1, V] after row 0's sequence and after each of the tokens `extra` (fed with
        it in one pass, last_only=False): a speculative step's verification. The cache then holds
        them all; the caller trims it back."""
        seq = self.sequences[0]
        self._ensure_cache(len(seq) + len(extra))
        cache = self.cache
        assert cache is not None
        if cache.offset and cache.tag != self.engine.rope_regime(len(seq)):
            cache.reset()
        if cache.offset >= len(seq):
            cache.trim(cache.offset - len(seq) + 1)  # feed at least the last token for its logits
        ids = torch.tensor([seq[cache.offset:] + list(extra)], dtype=torch.long, device=self.engine.device)
        self.cached_at_prefill = cache.offset
        self._logits = None
        return self.engine.forward(ids, cache, last_only=False, images=self.images)[0, -(len(extra) + 1):]

    def generate_next_token(self) -> None:
        if self.is_done():
            raise InvalidRequestError("generation is done; append tokens or rewind first", param="generator")
        p = self.params
        if p.logit_bias and max(p.logit_bias) >= self.engine.vocab_size:
            raise InvalidRequestError(f"token id {max(p.logit_bias)} is outside the vocabulary "
                                      f"[0, {self.engine.vocab_size})", param="logit_bias")
        if not self._queue and self.finish_reasons[0] is None and self._speculating():
            assert self.speculator is not None
            self._queue = self.speculator.step(self)
        if self._queue:  # a speculative step's tokens come out one per call, as plain decoding's do
            token, logits = self._queue.pop(0)
            self._next = [token]
            self._pending_logprobs = (logits, torch.tensor([token], device=logits.device), self.params.top_logprobs)
            self._advance()
            return
        logits = self._compute_logits()
        c = self.constraint
        x = self.chain(logits, self.sequences, self._prompt_len, sorted(self.eos), c.mask if c else None)
        self.last_processed = x
        tokens = self.sampler(x, self.rng)
        self._next = [int(t) for t in tokens.tolist()]
        self._record_logprobs(logits, tokens)
        if c is not None and self.finish_reasons[0] is None:
            c.advance(self._next[0])
            self._consumed.append((len(self.sequences[0]), self._next[0]))
        self._advance()

    def _advance(self) -> None:
        """Append self._next to the rows; update the finish reasons."""
        p = self.params
        for i, (seq, t) in enumerate(zip(self.sequences, self._next)):
            if self.finish_reasons[i] is not None:  # finished rows keep step with the batch but stay put
                self._next[i] = seq[-1]
                seq.append(seq[-1])
                continue
            seq.append(t)
            if t in self.eos:
                self.finish_reasons[i] = FINISH_STOP
        length = len(self.sequences[0])
        new = length - self._prompt_len
        if length >= self.max_length or (p.max_new_tokens is not None and new >= p.max_new_tokens):
            self.finish_reasons = [f or FINISH_LENGTH for f in self.finish_reasons]
        self._logits = None

    def _record_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """The model's log-probabilities (before penalties and warpers) of the chosen tokens, and of
        the top_logprobs most likely ones, per row: self.last_logprobs. Computed when first read
        (a log_softmax over the vocabulary costs ~0.2 ms a step, and most requests never ask);
        logits the caller owns (external_logits) may be reused, so theirs are computed now."""
        self._pending_logprobs = (logits, tokens, self.params.top_logprobs)
        if self.external:
            _ = self.last_logprobs

    @property
    def last_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Per row, the last step's (token, its log-probability, [(token, log-probability)] of the
        top_logprobs most likely)."""
        if self._pending_logprobs is not None:
            logits, tokens, top = self._pending_logprobs
            self._pending_logprobs = None
            logp = logits.log_softmax(dim=-1)
            chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
            tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
            if top:
                v, i = logp.topk(top, dim=-1)
                tops = [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
            self._last_logprobs = [(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]
        return self._last_logprobs

    @last_logprobs.setter
    def last_logprobs(self, value: list[tuple[int, float, list[tuple[int, float]]]]) -> None:
        self._pending_logprobs = None
        self._last_logprobs = value

    def is_done(self) -> bool:
        """True when every row stopped (eos / stop token) or reached max_length / max_new_tokens."""
        return all(f is not None for f in self.finish_reasons) and len(self.sequences[0]) > 0

    # ------------------------------------------------------------------ inspection
    def get_next_tokens(self) -> list[int]:
        return list(self._next)

    def get_sequence(self, index: int = 0) -> list[int]:
        check_int(index, "index", lo=0, hi=len(self.sequences) - 1,
                  what=f"a row index in [0, {len(self.sequences)})")
        return list(self.sequences[index])

    def get_logits(self) -> torch.Tensor:
        """Logits [B, vocab] (float32) the next generate_next_token() samples from."""
        return self._compute_logits().clone()

    def set_logits(self, logits: torch.Tensor, *, validate: bool = True) -> None:
        """Replace the logits the next generate_next_token() samples from ([B, vocab], or [vocab]
        for one row). For an external_logits generator this is how each step's logits arrive.
        validate=False takes float32 [B, vocab] logits as they are, without scanning them for
        NaN / inf: for a caller's own forward pass of the model (the batch engine's), checked no
        more than the Generator checks its own."""
        self._drop_queue()
        if not validate:
            self._logits = logits
            return
        shape: tuple[int, ...]
        if self.external and self._logits is None:
            shape, device = (self.params.batch_size, self.engine.vocab_size), torch.device(self.engine.device)
        else:
            ref = self._compute_logits()
            shape, device = tuple(ref.shape), ref.device
        x = torch.as_tensor(logits, dtype=torch.float32, device=device)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if tuple(x.shape) != shape:
            raise InvalidRequestError(f"expected shape {shape}, got {tuple(x.shape)}", param="logits")
        if torch.isnan(x).any() or not torch.isfinite(x).any(dim=-1).all() or (x == float("inf")).any():
            raise InvalidRequestError("each row needs a finite value and no NaN or +inf", param="logits")
        self._logits = x

    def _drop_queue(self) -> None:
        """Forget a speculative step's tokens not yet emitted (the cache keeps only keys of emitted ones)."""
        if not getattr(self, "_queue", None):
            return
        self._queue = []
        if self.cache is not None:
            self.cache.trim(self.cache.offset - min(self.cache.offset, max(0, len(self.sequences[0]) - 1)))
        self._logits = None

    def rewind_to(self, length: int) -> None:
        """Keep the first `length` tokens of every row; the cache keeps what it can reuse."""
        check_int(length, "length", lo=0, hi=len(self.sequences[0]))
        self._drop_queue()
        if self.constraint is not None:  # the grammar state steps back over the dropped generated tokens
            kept = [(i, t) for i, t in self._consumed if i < length]
            # llguidance keeps no undo entry for the end-of-sequence token that stopped it
            drop = sum(1 for i, t in self._consumed if i >= length and t not in self.engine.eos_token_ids)
            if drop:
                self.constraint.matcher.rollback(drop)
            self._consumed = kept
        for seq in self.sequences:
            del seq[length:]
        if self.cache is not None:
            # keep at most length-1 cached tokens so the last kept token is re-fed for its logits
            self.cache.trim(self.cache.offset - min(self.cache.offset, max(0, length - 1)))
        self._prompt_len = min(self._prompt_len, length)
        self._next = [s[-1] for s in self.sequences] if length else []
        self.finish_reasons = [None] * self.params.batch_size
        self._logits = None
