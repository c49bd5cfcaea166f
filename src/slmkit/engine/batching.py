"""Continuous batching: one thread owns the model and runs every active request's next token in
one forward pass (weights are read once per step for all of them). New requests join at the next
step (their prompt is prefilled into a free slot first), finished or cancelled ones leave at once,
freeing their slot. Each request keeps its own Generator (options, processors, grammar, seed,
stops) fed with its row of the batch's logits, so it decodes exactly as it would alone.

Prefill is chunked: joining requests' prompts run `prefill_chunk` tokens per step in all (a long
prompt a chunk at a time, several short ones in one step; each into a cache of its own, copied into
its slot when done) between the others' decode steps, so a long prompt delays them by one chunk
per step, not by the whole prompt, and a burst of short prompts joins in few steps.

LongRoPE (Phi-3 128k, Phi-3.5): each row takes the frequency set of its own length; a row that
grows past original_max is re-prefilled in its slot with the long set (the Generator's rule), and
a prompt already longer than that is prefilled in one piece.

Speculative decoding (engine/speculative.py): a row whose request speculates (the Generator's rule:
"ngram", "draft", or "auto": a draft model if given, else prompt lookup for a long prompt) drafts
from its own sequence (a draft model runs its k steps for that row alone, before the pass); the
step's one pass then feeds each row its pending token and its drafts, every row padded to the widest
(padding sits past the row's last real position, so the causal mask hides it from the row's own
queries and later steps overwrite it). Each row's drafts are verified on its logits by the same
Speculator as a single request's, its cache length rolls back to the kept tokens, and those go
out through its Generator one by one (stops, limits, logprobs as in plain decoding). The width
never takes a row past its slot or a short-regime row past the LongRoPE crossover. Every row pays
for the width, so a pass holds at most `spec_extra_tokens` tokens beyond one per row (a lone
stream drafts in full; a full batch, whose step already computes many rows, drafts little or not
at all): a bound on the padding's cost. Measured with 4 streams of the built-in model
(benchmarks/speculative.py --batch-streams 4: ~2 drafts a row): 1.19-1.74x plain per stream on
input-grounded tasks, 0.96x on open prose; other bounds are not measured.

Faults stay as small as they can: an error in one row's sampling, grammar or prefill ends that
request alone (its iterator raises it); an error in a shared forward pass ends the rows of that
step; the engine goes on. Should the thread stop anyway, it first marks itself dead (`dead`,
which the server's /health reports) and fails every queued request, and later ones fail at once.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import EngineError, MemoryPlanError, SlmkitError
from ..models.cache import KVCache, SlotCache
from ..streams import END as _END
from ..streams import Stream
from .generator import FINISH_LENGTH, Generator, GeneratorParams
from .images import ImageEntry
from .speculative import Speculator

KV_HEADROOM_BYTES = 512 * 2**20  # left free for activations, the tokenizer, the server
SPEC_EXTRA_TOKENS = 8  # a speculative pass's tokens beyond one per row: n rows draft up to 8 // n each


@dataclass
class _Request:
    gen: Generator
    prompt: list[int]
    want_logprobs: bool
    want_routing: bool = False  # a MoE model's expert choices per token (return_routing)
    out: Stream = field(default_factory=Stream)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: KVCache | None = None  # the prompt's own cache while it prefills
    spec: Speculator | None = None  # its drafter / verifier, when it speculates


class BatchEngine:
    def __init__(self, engine, *, slots: int = 8, slot_context: int | None = None, prefill_chunk: int = 128,
                 spec_extra_tokens: int | None = SPEC_EXTRA_TOKENS, start: bool = True):
        self.engine = engine
        a = engine.args
        self.slot_context = min(slot_context or engine.context_length, engine.context_length)
        self._check_memory(slots)
        self.cache = SlotCache(a.num_hidden_layers, slots, a.num_key_value_heads, a.head_dim, self.slot_context,
                               dtype=engine.dtype, device=engine.device)
        for t in self.cache.k + self.cache.v:  # commit the pages now: the plan is real memory, not a promise
            t.zero_()
        self.rows: list[_Request] = []
        self.pending: list[_Request] = []  # admitted, prefilling chunk by chunk
        self.prefill_chunk = prefill_chunk
        self.spec_extra_tokens = spec_extra_tokens  # drafted (or padding) tokens a pass may add; None: no bound
        self.incoming: queue.Queue[_Request | None] = queue.Queue()  # None: close
        self.steps = 0
        self.reused_tokens = 0  # prompt tokens taken from a finished request's slot, not prefilled
        self.dead: str | None = None  # why the engine thread stopped, once it has
        self._life = threading.Lock()  # orders "queue a request" against "die and fail the queue"
        self._thread = threading.Thread(target=self._loop, name="slmkit-batch", daemon=True)
        # at interpreter exit the thread finishes its step and stops before finalization: a daemon
        # thread still inside a native op then aborts the process ("terminate called ...")
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            engine = ref()
            if engine is not None:
                engine.close()

        self._close_at_exit = close_at_exit
        atexit.register(close_at_exit)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the engine thread (for BatchEngine(start=False): requests may queue first)."""
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped for a fault (not after close())."""
        return self.dead is None

    def submit(self, prompt: Sequence[int], params: GeneratorParams, want_logprobs: bool = False,
               images: Mapping[int, ImageEntry] | None = None, want_routing: bool = False) -> Iterator[tuple]:
        """Queue a request; yields (token, finish_reason, logprob info[, routing][, drafted,
        accepted]) as the engine produces them: with want_routing, each step's expert choices
        (layer -> (ids, weights)) of its row in the pass that chose the token; when it speculates,
        its drafted / accepted totals so far. Closing the iterator early cancels the request (its
        slot is freed before the next step)."""
        gen = Generator(self.engine, params, external_logits=True)
        gen.max_length = min(gen.max_length, self.slot_context)
        if images:
            gen.add_images(images)  # the prompt's image tokens (engine.attach_images)
        gen.append_tokens(list(prompt))  # validates ids and length in the caller's thread
        spec = gen.speculate_for_caller()  # and the drafting mode (refusals by name, here too)
        req = _Request(gen, list(prompt), want_logprobs, want_routing, spec=spec)
        with self._life:  # a request queued here is either failed by _die or run, never left waiting
            if self.dead is not None:
                raise EngineError(f"the batch engine has stopped ({self.dead}); restart the server or "
                                  "reload the model", dead=True)
            self.incoming.put(req)
        try:
            yield from req.out
        finally:
            req.cancelled.set()

    # ------------------------------------------------------------------ the engine thread
    def _check_memory(self, slots: int) -> None:
        """The KV plan (slots x slot_context) must fit the memory left, with room to run: a clear
        error naming what fits, not an out-of-memory kill under load."""
        from ..loading.memory import available_bytes

        a, e = self.engine.args, self.engine
        if torch.device(e.device).type != "cpu":
            return
        per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * e.dtype.itemsize
        need = per_token * slots * self.slot_context
        avail = available_bytes()
        if avail is None:
            return
        room = avail - KV_HEADROOM_BYTES
        if need > room:
            fits = max(0, room) // (per_token * slots)
            raise MemoryPlanError(
                f"the KV cache for {slots} slots x {self.slot_context} tokens needs {need / 2**30:.2f} GiB, but "
                f"{avail / 2**30:.2f} GiB of memory is available (keeping {KV_HEADROOM_BYTES / 2**30:.1f} GiB free); "
                + (f"{slots} slots fit {fits} tokens each: lower --slot-context or --slots" if fits >= 16
                   else "lower --slots"), needed=need, available=avail)

    def close(self) -> None:
        """Stop the engine thread: requests still running or queued end at once (their iterators
        finish without a finish reason); the slots' memory goes with this object."""
        atexit.unregister(self._close_at_exit)
        self.incoming.put(None)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=30)

    def _shutdown(self) -> None:
        for req in self.rows + self.pending + self._drain_incoming():
            req.out.put(_END)
        self.rows, self.pending = [], []

    def _drain_incoming(self) -> list[_Request]:
        """Every request still queued for admission (the close sentinel dropped)."""
        out: list[_Request] = []
        while True:
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return out
            if item is not None:
                out.append(item)

    def _loop(self) -> None:
        while True:
            try:
                return self._run()  # returns on close()
            except Exception as e:  # noqa: BLE001
                # a fault in a shared step (the batch's forward pass) is no one row's: the rows of
                # that step end with it and the engine goes on; with no row to end it would only repeat
                if not self.rows:
                    return self._die(e)
                try:
                    for i in reversed(range(len(self.rows))):
                        self._fail(i, e)
                except BaseException as again:  # noqa: BLE001 -- the engine's own state is broken
                    return self._die(again)
            except BaseException as e:  # noqa: BLE001 -- whatever stops the thread must not strand requests
                return self._die(e)

    def _die(self, e: BaseException) -> None:
        """The thread cannot go on: say so (alive, /health) and fail every request it holds or
        that is queued, so none waits forever."""
        with self._life:
            self.dead = f"{type(e).__name__}: {e}"
            waiting = self.rows + self.pending + self._drain_incoming()
            self.rows, self.pending = [], []
        for req in waiting:  # one error object per request: each is raised in its own thread
            req.out.put(EngineError(f"the batch engine stopped ({self.dead})", dead=True))
            req.out.put(_END)

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            if not self.rows and not self.pending:
                item = self.incoming.get()  # idle: wait for work
                if item is None:
                    return self._shutdown()
                self.pending.append(item)
            while len(self.rows) + len(self.pending) < self.cache.slots:
                try:
                    item = self.incoming.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return self._shutdown()
                self.pending.append(item)
            self._drop_cancelled()
            trace = getattr(self.engine.model, "routing", None)
            if trace is not None:  # passes recorded only while some request wants them
                trace.passes.clear()
                trace.keep_passes = any(r.want_routing for r in self.rows + self.pending)
            budget = self.prefill_chunk  # prompt tokens per step, filled from several short prompts
            while self.pending and budget > 0:
                req = self.pending[0]
                budget -= self._prefill_chunk(req, budget)
                if req in self.pending:  # it took the whole budget
                    break
            if not self.rows:
                continue
            if self.engine.rope_crossover is not None:
                self._cross_long_rope()
            if self.rows:
                self._decode()

    def _decode(self) -> None:
        """One pass for every row: its pending token, then (a row that speculates) its drafts,
        every row padded to the widest; then each row's tokens out."""
        plans = self._drafts()
        if not self.rows:  # each failed while drafting
            return
        drafts = [d for d, _ in plans]
        width = 1 + max(len(d) for d in drafts)
        pending = [r.gen.get_next_tokens()[0] for r in self.rows]
        if width == 1:  # no drafts: a plain decode step
            ids = torch.tensor([[t] for t in pending], device=self.engine.device)
            logits = self.engine.forward_slots(ids, self.cache)
            self.steps += 1
            for i in reversed(range(len(self.rows))):
                self._step(i, logits[i:i + 1])
            return
        ids = torch.tensor([[t] + d + [t] * (width - 1 - len(d)) for t, d in zip(pending, drafts)],
                           device=self.engine.device)
        logits = self.engine.forward_slots(ids, self.cache, last_only=False)  # [n, width, V]
        self.steps += 1
        for i in reversed(range(len(self.rows))):  # reversed: a leaving row's slot takes the last row
            self.cache.lens[i] -= width - 1  # the pending token's key stays; drafts' keys as verified
            if drafts[i]:
                self._verify(i, plans[i], logits[i, :len(drafts[i]) + 1])
            else:
                self._step(i, logits[i, :1], pos=0)

    def _drafts(self) -> list[tuple[list[int], list[torch.Tensor] | None]]:
        """Each row's drafts for this step ([] for a plain row) and, from a draft model that
        samples, its probabilities: as many as its Speculator plans (room for the tokens after
        them, its own crossover), and no more than keep the pass within spec_extra_tokens, the
        widest row inside every slot and every short-regime row short of the LongRoPE crossover
        (a row's frequency set follows the last position it is fed, padding included)."""
        if not any(r.spec is not None for r in self.rows):
            return [([], None) for _ in self.rows]
        lens = [int(n) for n in self.cache.lens[: len(self.rows)]]
        width = min(self.cache.capacity - n for n in lens)
        if self.spec_extra_tokens is not None:  # every row is padded to the width: n * (width - 1) extra tokens
            width = min(width, 1 + self.spec_extra_tokens // len(lens))
        crossover = self.engine.rope_crossover
        if crossover is not None:
            width = min([width] + [crossover - n for n in lens if n < crossover])
        plans: dict[int, tuple[list[int], list[torch.Tensor] | None]] = {}
        for i in reversed(range(len(self.rows))):  # reversed: a failed row's slot takes the last row
            req = self.rows[i]
            try:  # a draft model's steps run for this row alone: what fails there ends this request only
                plans[id(req)] = req.spec.plan(req.gen, width - 1) if req.spec is not None and width > 1 else ([], None)
            except Exception as e:  # noqa: BLE001
                self._fail(i, e)
        return [plans[id(r)] for r in self.rows]

    def _verify(self, i: int, plan: tuple[list[int], list[torch.Tensor] | None], logits: torch.Tensor) -> None:
        """Row i's drafts (and their draft probabilities) against its logits [len(drafts) + 1, V]:
        the kept tokens go out one by one through its Generator until it stops; its cache keeps
        their keys, less the last."""
        req = self.rows[i]
        assert req.spec is not None
        try:  # the row's processors and draws, as in _step: a failure ends this request only
            out = req.spec.verify(req.gen, plan[0], plan[1], logits)
        except Exception as e:  # noqa: BLE001
            return self._fail(i, e)
        self.cache.lens[i] += len(out) - 1
        self._emit(i, out, 0)

    def _emit(self, i: int, out: list, first: int) -> None:
        """A verified run of row i (its cache already holds the kept tokens' keys, less the last):
        the tokens go out one by one through its Generator until it stops. first: the position in
        the pass of the logits that chose out[0]."""
        req = self.rows[i]
        req.gen.queue_verified(out)
        for j in range(len(out)):
            self._step(i, None, first + j)
            if i >= len(self.rows) or self.rows[i] is not req:  # it finished (or failed): the slot is gone
                return

    def _prefill_chunk(self, req: _Request, budget: int) -> int:
        """The next chunk (at most `budget` tokens) of a pending prompt; when it is all in, the
        request joins the batch and its first token goes out (a request that speculates feeds its
        drafts with the last chunk and its first tokens are the verified run, as a single request's
        first step gives them). Returns the tokens it ran."""
        chunk: list[int] = []
        try:
            if req.cache is None:
                req.cache = self.engine.new_cache(1, len(req.prompt))
                self._reuse_prefix(req)
            done = req.cache.offset
            whole = self.engine.rope_switches(len(req.prompt))
            chunk = req.prompt[done:] if whole else req.prompt[done: done + budget]  # one frequency set
            if done + len(chunk) < len(req.prompt):
                self.engine.forward(torch.tensor([chunk], device=self.engine.device), req.cache, images=req.gen.images)
                return len(chunk)
            logits, out = self._pass_alone(req, chunk, req.cache)
            self.pending.remove(req)
            row = self.cache.add_row()
            self.rows.append(req)
            self.cache.load_row(row, req.cache, req.cache.offset)
            req.cache = None
            if out:
                self._emit(row, out, -len(logits))
            else:
                self._step(row, logits)
        except Exception as e:  # noqa: BLE001 -- a bad request fails alone
            if req in self.pending:
                self.pending.remove(req)
                req.out.put(_error_for(e))
                req.out.put(_END)
            elif req in self.rows:
                self._fail(self.rows.index(req), e)
        return max(1, len(chunk))

    def _reuse_prefix(self, req: _Request) -> None:
        """Start from the keys/values a finished request left in a free slot, when its tokens
        begin this prompt (a follow-up turn of a chat, a shared system prompt, a retry)."""
        if self.engine.rope_switches(len(req.prompt)):
            return  # prefilled in one piece with the long frequency set
        row, n = self.cache.prefix(req.prompt)
        n = min(n, len(req.prompt) - 1)  # the last prompt token is fed again for its logits
        if n > 0:
            assert req.cache is not None  # _prefill_chunk made the prompt's cache just before
            self.cache.copy_prefix(row, n, req.cache)
            self.reused_tokens += n

    def _cross_long_rope(self) -> None:
        """Rows whose pending token takes them past original_max: re-prefill the whole sequence
        (with the long frequency set, as the Generator does) into the slot, with the row's drafts
        when it speculates (as a single request's step there does), then step them."""
        for i in reversed(range(len(self.rows))):
            n = int(self.cache.lens[i])  # cached; with the pending token, n + 1
            if self.engine.rope_switches(n) or not self.engine.rope_switches(n + 1):
                continue
            req = self.rows[i]
            seq = req.gen.sequences[0]  # the cached tokens and the pending one
            tmp = self.engine.new_cache(1, len(seq))
            try:  # this row's own pass: what fails there ends this request only
                logits, out = self._pass_alone(req, seq, tmp)
            except Exception as e:  # noqa: BLE001
                self._fail(i, e)
                continue
            self.cache.load_row(i, tmp, tmp.offset)
            if out:
                self._emit(i, out, -len(logits))
            else:
                self._step(i, logits)

    def _pass_alone(self, req: _Request, ids: list[int], cache: KVCache) -> tuple[torch.Tensor, list]:
        """ids (a prompt's last chunk, or a whole sequence) after what `cache` holds, in a pass of
        this request's own, with its drafts when it speculates: (logits [1 or k + 1, V] at the end,
        the verified run or [] for a plain step). The cache then holds the keys of every token but
        the run's last, as after a single request's speculative step."""
        drafts, q = req.spec.plan(req.gen) if req.spec is not None else ([], None)
        logits = self.engine.forward(torch.tensor([ids + drafts], device=self.engine.device), cache,
                                     images=req.gen.images, last_only=not drafts)[0, -(len(drafts) + 1):]
        if not drafts:
            return logits, []
        assert req.spec is not None
        out = req.spec.verify(req.gen, drafts, q, logits)
        cache.trim(len(drafts) + 1 - len(out))  # the rejected drafts' keys
        return logits, out

    def _step(self, i: int, logits: torch.Tensor | None, pos: int = -1) -> None:
        """Row i's next token: drawn from logits [1, V] (the model's own, as a Generator's forward
        gives them), or with None the next of a verified run its Generator has queued. pos: the
        position of the pass that chose it (for the routing record)."""
        req = self.rows[i]
        gen = req.gen
        if logits is not None:
            gen.set_logits(logits, validate=False)
        try:  # this row's processors, grammar and draw: whatever fails there ends this request only
            gen.generate_next_token()
        except Exception as e:  # noqa: BLE001
            return self._fail(i, e)
        token, reason = gen.get_next_tokens()[0], gen.finish_reasons[0]
        if reason is None and len(gen.sequences[0]) >= self.slot_context:
            reason = FINISH_LENGTH  # the slot is full
        lp = gen.last_logprobs[0] if req.want_logprobs else None
        routing = None
        if req.want_routing:  # the last pass chose this token: a decode step (row i) or this row's prefill (row 0)
            last = self.engine.model.routing.passes[-1]
            row = i if next(iter(last.values()))[0].shape[0] > 1 else 0
            routing = {layer: (ids[row, pos], w[row, pos]) for layer, (ids, w) in last.items()}
        if reason is not None:  # freed before the last token goes out: whoever has it finds the slot free
            self._remove(i, keep=True)
        item: tuple = (token, reason, lp) + (() if routing is None else (routing,))
        req.out.put(item if req.spec is None else item + (req.spec.drafted, req.spec.accepted))
        if reason is not None:
            req.out.put(_END)

    def _fail(self, i: int, e: BaseException) -> None:
        """End row i with an error: its request raises it, its slot is freed (its keys are not
        kept: the row may be half-way through a step)."""
        req = self.rows[i]
        self._remove(i)
        req.out.put(_error_for(e))
        req.out.put(_END)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled.is_set():
                self.rows[i].out.put(_END)
                self._remove(i)
        for req in [r for r in self.pending if r.cancelled.is_set()]:
            self.pending.remove(req)
            req.out.put(_END)

    def _remove(self, i: int, keep: bool = False) -> None:
        kept = None
        if keep:  # the tokens whose keys/values the row holds, when valid for reuse
            seq = self.rows[i].gen.sequences[0]
            n = min(int(self.cache.lens[i]), len(seq) - 1)  # a run that stopped early: its keys up to the stop
            if not self.engine.rope_switches(n):
                kept = seq[:n]
        self.cache.remove_row(i, kept)
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last



def _error_for(e: BaseException) -> SlmkitError:
    """What a failed request raises: a typed error as it is (a grammar dead end, a bad option),
    anything else as an EngineError that names it."""
    if isinstance(e, SlmkitError):
        return e
    err = EngineError(f"the request failed in the batch engine: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err
