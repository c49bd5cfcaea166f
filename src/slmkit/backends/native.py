"""The native PyTorch backend: our own engine and Generator."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.engine import Engine
from ..engine.generator import Generator, GeneratorParams
from ..engine.speculative import check_draft_model
from ..errors import InvalidRequestError, UnsupportedInputError
from ..loading.files import is_regular_file
from ..loading.hf import load_hf_folder
from ..loading.memory import ram_by_precision
from ..options import GenerationOptions
from ..streams import on_own_thread
from .base import BackendStats, Capabilities, ModelDescription, SearchResult, Session, TokenStep

if TYPE_CHECKING:
    from ..engine.batching import BatchEngine



class NativeSession(Session):
    """The native backend's conversation state: the Generator, whose sequence and KV cache the
    next call reuses as far as its prompt matches."""

    def __init__(self) -> None:
        self.generator: Generator | None = None
        self.prefilled = 0

    @property
    def cached_tokens(self) -> int:
        return len(self.generator.sequences[0]) if self.generator is not None else 0

    @property
    def last_prefill(self) -> int:
        return self.prefilled

    def clear(self) -> None:
        self.generator, self.prefilled = None, 0


class NativeBackend:
    capabilities = Capabilities(logits=True, batching=True, prompt_cache=True, sessions=True, beam_search=True,
                                structured_output=True, logprobs=True, embeddings=True)

    def __init__(self, engine: Engine):
        self.engine = engine
        self.path: Path | None = None  # where the model was loaded from
        # a BatchEngine once enable_batching() ran: concurrent requests share steps
        self.batch: BatchEngine | None = None
        self.tokens_generated = 0  # for the server's metrics
        self.prompt_cache = False  # keep the last request's KV for the next prompt (servers; one at a time)
        self._prompt_state = NativeSession()
        self.reused_tokens = 0  # prompt tokens taken from that cache (or the batch's kept slots)
        self.name = engine.name
        self.model_type = engine.model_type
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length
        self.vocab_size = engine.vocab_size
        self.capabilities = dataclasses.replace(self.capabilities, images=engine.takes_images,
                                                routing=getattr(engine.model, "routing", None) is not None)
        self.image_processor: Any = None  # a vision model's (from_path reads preprocessor_config.json)

    @classmethod
    def from_path(cls, path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
                  pack: bool = True, quant: str | None = None, group_size: int | None = None) -> NativeBackend:
        """Load on a thread of its own (streams.on_own_thread): the caller's thread, perhaps a
        server's event loop, keeps no OpenMP pool from the load to slow the engine's down."""
        return on_own_thread(cls._from_path, Path(path), dtype=dtype, device=device, pack=pack, quant=quant,
                             group_size=group_size)

    @classmethod
    def _from_path(cls, path: Path, *, dtype: str | torch.dtype, device: str, pack: bool, quant: str | None,
                   group_size: int | None) -> NativeBackend:
        if is_regular_file(path) or path.suffix.lower() == ".gguf":  # GGUF: its reader names what is wrong
            from ..loading.gguf import load_gguf

            loaded = load_gguf(path, dtype=dtype, device=device, quant=quant, group_size=group_size)
        else:
            loaded = load_hf_folder(path, dtype=dtype, device=device, quant=quant, group_size=group_size)
        backend = cls(Engine(loaded, pack=pack))
        backend.path = path
        if backend.engine.takes_images:
            from ..vision.phi3v import Phi3VProcessor

            backend.image_processor = Phi3VProcessor.from_folder(path, backend.tokenizer)
        return backend

    # ------------------------------------------------------------------ configuration
    def enable_batching(self, slots: int = 8, context: int | None = None) -> None:
        """Serve concurrent stream_tokens() calls by continuous batching (engine/batching.py)."""
        from ..engine.batching import BatchEngine

        # raises if it cannot fit; built (its KV cache filled) on a thread of its own, so that the engine's
        # thread is the one that runs parallel regions from now on (streams.on_own_thread)
        batch = on_own_thread(BatchEngine, self.engine, slots=slots, slot_context=context)
        if self.batch is not None:
            self.batch.close()  # the new plan replaces the old one
        self.batch = batch

    def enable_prompt_cache(self, on: bool = True) -> None:
        self.prompt_cache = bool(on)
        if not on:
            self._prompt_state.clear()

    def close(self) -> None:
        """Stop continuous batching (if on) and drop the engine, so its memory can be freed."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        self._prompt_state.clear()
        self.engine = None  # type: ignore[assignment]

    def new_session(self) -> NativeSession:
        return NativeSession()

    # ------------------------------------------------------------------ what it is, how it runs
    def describe(self) -> ModelDescription:
        from ..quant.linear import QuantLinear, kernel_active

        engine, params, weight_bytes, quantized = self.engine, 0, 0, 0
        tied = getattr(engine.args, "tie_word_embeddings", False)  # then lm_head is the embedding again
        for name, m in engine.model.named_modules():
            if tied and name == "lm_head":
                continue
            if hasattr(m, "qweight"):  # quantized linears / embeddings hold their weights as buffers: n x k
                params += m.weight_q.n * m.weight_q.k
            quantized += isinstance(m, QuantLinear)
            params += sum(p.numel() for p in m.parameters(recurse=False))
        counted = set()  # a tied quantized embedding shares the head's buffers
        for t in list(engine.model.parameters()) + list(engine.model.buffers()):
            if (t.data_ptr(), t.numel()) not in counted:
                counted.add((t.data_ptr(), t.numel()))
                weight_bytes += t.numel() * t.element_size()
        quantization = ""
        if quantized:
            from ..kernels import qgemm

            how = (f"{qgemm.variant} kernel" if kernel_active()
                   else f"PyTorch fallback: {qgemm.build_error or 'kernel disabled'}")
            quantization = f"{quantized} quantized layers ({how})"
        return ModelDescription(
            model_type=self.model_type, context_length=self.context_length, parameters=params,
            weight_bytes=weight_bytes, format="gguf" if getattr(engine, "gguf", None) is not None else "safetensors",
            dtype=str(engine.dtype).removeprefix("torch."), quantization=quantization,
            chat_template=self.tokenizer.chat_template or "", ram_needed=ram_by_precision(engine.model))

    def stats(self) -> BackendStats:
        batch = self.batch  # once: close() may clear it meanwhile
        trace = getattr(self.engine.model, "routing", None)
        hits = tuple(tuple(row) for row in trace.hits.tolist()) if trace is not None else ()
        if batch is None:
            return BackendStats(self.tokens_generated, self.reused_tokens, request_context=self.context_length,
                                expert_hits=hits)
        return BackendStats(self.tokens_generated, self.reused_tokens + batch.reused_tokens, batching=True,
                            slots=batch.cache.slots, request_context=batch.slot_context, batch_size=batch.active,
                            batch_steps=batch.steps, kv_slots_used=batch.cache.n, kv_bytes=batch.cache.nbytes,
                            dead=batch.dead, expert_hits=hits)

    # ------------------------------------------------------------------ generation
    def params(self, options: GenerationOptions) -> GeneratorParams:
        """The engine's GeneratorParams for a request (the model's sampling defaults filled in)."""
        return GeneratorParams.for_request(options, self.engine.generation_config)

    def process(self, prompt: str, images: Sequence[Any], num_crops: int | None = None) -> Any:
        """A vision model's processor: prompt text with <|image_N|> tags and its images ->
        MultimodalInputs (slmkit.vision)."""
        if self.image_processor is None:
            raise UnsupportedInputError(f"model {self.name!r} ({self.model_type}) takes no images", param="images")
        return self.image_processor(prompt, images, num_crops=num_crops)

    def stream_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions,
                      session: Session | None = None, images: Any = None) -> Iterator[TokenStep]:
        """Generate after prompt_ids. With a session the Generator (and its KV cache) lives on in it
        between calls: a prompt that extends or edits the previous turn's tokens prefills only what
        differs from the longest common prefix (session.last_prefill says how many)."""
        if session is not None and not isinstance(session, NativeSession):
            raise InvalidRequestError("a session of another backend", param="session")
        params = self.params(options)
        ids, entries = self._attach(prompt_ids, images)
        want = options.wants_logprobs
        if options.draft is not None:
            check_draft_model(self.engine, options.draft)
        if options.return_routing and (self.batch is None or session is not None):
            # one pass per token here (a verified run's tokens would share one): "auto" decodes plainly
            if options.speculative in ("ngram", "draft"):
                raise InvalidRequestError(f"speculative={options.speculative!r} cannot be combined with "
                                          "return_routing outside continuous batching", param="speculative")
            plain = options.replace(return_routing=False, speculative="none", draft=None)
            yield from self._with_routing(self.stream_tokens(prompt_ids, plain, session, images))
            return
        if self.batch is not None and session is None:
            steps = self.batch.submit(ids, params, want, entries, want_routing=options.return_routing)
        elif self.prompt_cache and session is None:
            steps = self._cached(ids, params, want, entries)
        else:
            steps = self._generate(ids, params, session, want, entries)
        for item in steps:  # (token, reason, lp[, routing][, drafted, accepted]); lp: (token, logprob, top) or None
            token, reason, lp = item[:3]
            self.tokens_generated += 1
            extra = list(item[3:])
            routing = extra.pop(0) if extra and isinstance(extra[0], dict) else None  # the batch engine's, this row's
            drafted, accepted = extra[:2] if len(extra) >= 2 else (0, 0)  # speculative totals so far
            step = TokenStep(token, reason, drafted=drafted, accepted=accepted)
            if routing is not None:
                step.routing = _token_routing(routing)
            if lp is not None:
                step.logprob, step.top_logprobs = lp[1], (lp[2] if options.top_logprobs else None)
            yield step

    def _with_routing(self, steps: Iterator[TokenStep]) -> Iterator[TokenStep]:
        """steps with .routing: the experts the last position of the pass that produced each step's
        logits chose, per layer (the model records its passes while this runs)."""
        trace: Any = getattr(self.engine.model, "routing")  # noqa: B009 (a Routing, not a Module attribute)
        trace.keep_passes = True
        try:
            while True:
                trace.passes.clear()
                step = next(steps, None)
                if step is None:
                    return
                if trace.passes:
                    step.routing = _token_routing({i: (ids[0, -1], w[0, -1]) for i, (ids, w) in
                                                   trace.passes[-1].items()})
                yield step
        finally:
            trace.keep_passes = False
            trace.passes.clear()

    def _attach(self, prompt_ids: Sequence[int], images: Any) -> tuple[list[int], dict[int, Any]]:
        """The prompt's ids with image placeholders (-k) as the engine's image ids, and the images."""
        if images is None:
            return list(prompt_ids), {}
        return self.engine.attach_images(list(prompt_ids), images.pixel_values, images.image_sizes,
                                         list(images.num_image_tokens or []))

    def _cached(self, ids: list[int], params: GeneratorParams, want_logprobs: bool,
                images: dict[int, Any]) -> Iterator[tuple]:
        """One request at a time with a prompt cache: the previous request's Generator (and KV
        cache) serves as a session, so a prompt sharing its start prefills only the rest."""
        state, finished = self._prompt_state, False
        try:
            first = True
            for step in self._generate(ids, params, state, want_logprobs, images):
                if first:  # the keys the prefill found in place (not what the session rule skipped)
                    assert state.generator is not None
                    self.reused_tokens += state.generator.cached_at_prefill
                    first = False
                finished = step[1] is not None
                yield step
        except BaseException:
            if not finished:
                state.clear()  # a failed or abandoned request leaves no half-state behind
            raise

    def _generate(self, ids: list[int], params: GeneratorParams, session: NativeSession | None,
                  want_logprobs: bool, images: dict[int, Any] | None = None) -> Iterator[tuple]:
        gen = session.generator if session is not None else None
        if gen is None:
            gen = Generator(self.engine, params)
            gen.add_images(images or {})
            gen.append_tokens(ids)
            common = 0
        else:
            gen.configure(params)
            seq = gen.sequences[0]
            common = next((i for i, (a, b) in enumerate(zip(seq, ids)) if a != b), min(len(seq), len(ids)))
            common = min(common, len(ids) - 1)  # at least one token to feed for the next logits
            gen.rewind_to(common)
            gen.add_images(images or {})
            gen.append_tokens(ids[common:])
        if session is not None:
            session.generator, session.prefilled = gen, len(ids) - common
        while not gen.is_done():
            gen.generate_next_token()
            yield (gen.get_next_tokens()[0], gen.finish_reasons[0], gen.last_logprobs[0] if want_logprobs else None,
                   gen.drafted_tokens, gen.accepted_tokens)

    def beam_search(self, prompt_ids: Sequence[int], options: GenerationOptions) -> list[SearchResult]:
        """Beam search (engine/beam.py, transformers' semantics) with the options' logits
        processors; the sampling knobs do not apply (the search is deterministic)."""
        from ..engine.beam import beam_search

        params = self.params(options.update(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                            num_beams=1, num_return_sequences=1))
        room = min(options.max_length or self.context_length, self.context_length) - len(prompt_ids)
        max_new = min(options.max_new_tokens or room, max(room, 1))  # beam_search names a prompt that fills it
        eos = () if options.ignore_eos else sorted(self.engine.eos_token_ids | frozenset(options.stop_token_ids))
        beams = beam_search(self.engine, prompt_ids, num_beams=options.num_beams, max_new_tokens=max_new,
                            num_return_sequences=options.num_return_sequences,
                            length_penalty=options.length_penalty, early_stopping=options.early_stopping,
                            eos_ids=eos, params=params)
        self.tokens_generated += sum(len(b.token_ids) for b in beams)
        return [SearchResult(b.token_ids, b.score, b.finish_reason) for b in beams]

    def logits(self, ids: Sequence[int], images: Any = None) -> Any:
        ids, entries = self._attach(ids, images)
        return self._aside(self.engine.logits, ids, entries)

    def embed(self, rows: Sequence[Sequence[int]]) -> Any:
        return self._aside(self.engine.embed, rows)

    def _aside(self, fn: Any, *args: Any) -> Any:
        """fn(*args) beside continuous batching: on a thread of its own (streams.on_own_thread), so
        that the calling thread (a server's worker, which lives on) keeps no OpenMP pool beside the
        engine thread's; without batching, here."""
        return fn(*args) if self.batch is None else on_own_thread(fn, *args)


def _token_routing(per_layer: dict) -> Any:
    """{layer: (expert ids [k], weights [k])} -> a results.TokenRouting."""
    from ..results import TokenRouting

    layers = sorted(per_layer)
    return TokenRouting([per_layer[i][0].tolist() for i in layers], [per_layer[i][1].tolist() for i in layers])
