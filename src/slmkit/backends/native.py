"""The native PyTorch backend: our own engine and Generator."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..engine.engine import Engine
from ..loading.files import is_regular_file
from ..engine.generator import Generator, GeneratorParams
from ..loading.hf import load_hf_folder
from .base import EXTRA_OPTIONS, SamplingOptions, TokenStep


class NativeBackend:
    supports_images = False

    def __init__(self, engine: Engine):
        self.engine = engine
        self.path: Path | None = None  # where the model was loaded from
        self.batch = None  # a BatchEngine once enable_batching() ran: concurrent requests share steps
        self.tokens_generated = 0  # for the server's metrics
        self.prompt_cache = False  # keep the last request's KV for the next prompt (servers; one at a time)
        self._prompt_state: dict = {}
        self.reused_tokens = 0  # prompt tokens taken from that cache (or the batch's kept slots)
        self.name = engine.name
        self.model_type = engine.model_type
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length
        self.vocab_size = engine.vocab_size

    @classmethod
    def from_path(cls, path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
                  pack: bool = True, quant: str | None = None, group_size: int | None = None) -> "NativeBackend":
        path = Path(path)
        q = dict(quant=quant, group_size=group_size)
        if is_regular_file(path) or path.suffix.lower() == ".gguf":  # GGUF: its reader names what is wrong
            from ..loading.gguf import load_gguf

            backend = cls(Engine(load_gguf(path, dtype=dtype, device=device, **q), pack=pack))
        else:
            backend = cls(Engine(load_hf_folder(path, dtype=dtype, device=device, **q), pack=pack))
        backend.path = path
        return backend

    def enable_batching(self, slots: int = 8, slot_context: int | None = None) -> None:
        """Serve concurrent stream_tokens() calls by continuous batching (engine/batching.py)."""
        from ..engine.batching import BatchEngine

        batch = BatchEngine(self.engine, slots=slots, slot_context=slot_context)  # raises if it cannot fit
        if self.batch is not None:
            self.batch.close()  # the new plan replaces the old one
        self.batch = batch

    def close(self) -> None:
        """Stop continuous batching (if on) and drop the engine, so its memory can be freed."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        self._prompt_state.clear()
        self.engine = None  # type: ignore[assignment]

    def stream_tokens(self, prompt_ids: Sequence[int], options: SamplingOptions,
                      session: dict | None = None) -> Iterator[TokenStep]:
        """Generate after prompt_ids. With a `session` dict the Generator (and its KV cache) lives on
        in it between calls: a prompt that extends or edits the previous turn's tokens prefills only
        what differs from the longest common prefix (session["prefilled"] says how many)."""
        extra = {k: getattr(options, k) for k in EXTRA_OPTIONS if k != "logprobs"}
        params = GeneratorParams(
            max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_k=options.top_k,
            top_p=options.top_p, seed=options.seed, stop_token_ids=tuple(options.stop_token_ids),
            ignore_eos=options.ignore_eos, **extra,
        )
        ids = list(prompt_ids)
        want = options.logprobs or options.top_logprobs > 0
        if self.batch is not None and session is None:
            steps = self.batch.submit(ids, params, want)
        elif self.prompt_cache and session is None:
            steps = self._cached(ids, params, want)
        else:
            steps = self._generate(ids, params, session, want)
        for token, reason, lp in steps:  # lp: (token, logprob, top alternatives) or None
            self.tokens_generated += 1
            step = TokenStep(token, reason)
            if lp is not None:
                step.logprob, step.top_logprobs = lp[1], (lp[2] if options.top_logprobs else None)
            yield step

    def _cached(self, ids: list[int], params: GeneratorParams, want_logprobs: bool) -> Iterator[tuple]:
        """One request at a time with a prompt cache: the previous request's Generator (and KV
        cache) serves as a session, so a prompt sharing its start prefills only the rest."""
        state, finished = self._prompt_state, False
        try:
            first = True
            for step in self._generate(ids, params, state, want_logprobs):
                if first:  # the keys the prefill found in place (not what the session rule skipped)
                    self.reused_tokens += state["generator"].cached_at_prefill
                    first = False
                finished = step[1] is not None
                yield step
        except BaseException:
            if not finished:
                state.clear()  # a failed or abandoned request leaves no half-state behind
            raise

    def _generate(self, ids: list[int], params: GeneratorParams, session: dict | None,
                  want_logprobs: bool) -> Iterator[tuple]:
        gen = session.get("generator") if session is not None else None
        if gen is None:
            gen = Generator(self.engine, params)
            gen.append_tokens(ids)
            common = 0
        else:
            gen.configure(params)
            seq = gen.sequences[0]
            common = next((i for i, (a, b) in enumerate(zip(seq, ids)) if a != b), min(len(seq), len(ids)))
            common = min(common, len(ids) - 1)  # at least one token to feed for the next logits
            gen.rewind_to(common)
            gen.append_tokens(ids[common:])
        if session is not None:
            session["generator"], session["prefilled"] = gen, len(ids) - common
        while not gen.is_done():
            gen.generate_next_token()
            yield gen.get_next_tokens()[0], gen.finish_reasons[0], gen.last_logprobs[0] if want_logprobs else None

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        return self.engine.logits(ids)
