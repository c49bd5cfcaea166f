"""Helpers of the batch-speculation tests (tests/engine/test_batch_speculative*.py): prompts that
repeat themselves, a plain solo run, a batch of requests from threads, and a guard that no batch
row runs a verification pass of its own (import the fixture into a test module to arm it)."""
from __future__ import annotations

import random
import threading

import pytest

from slmkit.engine.batching import BatchEngine
from slmkit.engine.generator import Generator, GeneratorParams


@pytest.fixture(autouse=True)
def rows_never_run_the_model_themselves(monkeypatch):
    """A batch row's Generator takes its logits from the engine's passes: its own verification
    pass (forward_all, a single request's) must never run on the engine thread."""
    forward_all = Generator.forward_all

    def guarded(self, extra):
        assert threading.current_thread().name != "slmkit-batch", "a batch row ran its own verification pass"
        return forward_all(self, extra)

    monkeypatch.setattr(Generator, "forward_all", guarded)


def prompts(n: int, length: int = 40, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (prompt lookup finds drafts), every third one random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(3, 400) for _ in range(length // 2)]
        out.append(base + base if i % 3 else [rng.randrange(3, 400) for _ in range(length)])
    return out


def solo(llm, prompt: list[int], **kw) -> list[int]:
    gen = Generator(llm, GeneratorParams(speculative="none", **kw))
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(gen.get_next_tokens()[0])
    return out


def run_batch(batch: BatchEngine, reqs: list[tuple[list[int], dict]], late: int = 0) -> list[list[tuple]]:
    """Submit every request from its own thread, all queued before the engine starts; the last
    `late` ones join once the others have produced a few tokens. Returns each one's items."""
    got: list = [None] * len(reqs)
    started = threading.Event()

    def run(i: int) -> None:
        prompt, kw = reqs[i]
        items = []
        for item in batch.submit(prompt, GeneratorParams(**kw)):
            items.append(item)
            if len(items) == 3:
                started.set()
        got[i] = items

    early = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs) - late)]
    for t in early:
        t.start()
    while batch.incoming.qsize() < len(early):
        threading.Event().wait(0.01)
    batch.start()
    assert started.wait(60)
    later = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs) - late, len(reqs))]
    for t in later:
        t.start()
    for t in early + later:
        t.join(timeout=120)
    return got


def submit_two_then_start(batch: BatchEngine, reqs: list[tuple[list[int], GeneratorParams]]) -> list:
    """Two requests submitted from threads to a batch engine not yet started (so both join its first
    step), then the engine started: each request's token ids, or the EngineError it ended with."""
    from slmkit.errors import EngineError

    got: list = [None, None]

    def run(i: int) -> None:
        try:
            got[i] = [item[0] for item in batch.submit(*reqs[i])]
        except EngineError as e:
            got[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    while batch.incoming.qsize() < 2:
        threading.Event().wait(0.01)
    batch.start()
    for t in threads:
        t.join(timeout=120)
    return got


def first_token_chi2(p, drafted: int, counts, draws: int) -> float:
    """Pearson's chi-square of first-token counts against the target distribution p, in bins: the
    drafted token, the four likeliest others, the rest."""
    import torch

    others = [int(i) for i in p.argsort(descending=True) if int(i) != drafted][:4]
    bins = [[drafted]] + [[i] for i in others]
    expected = torch.stack([p[b].sum() for b in bins] + [1 - sum(p[b].sum() for b in bins)]) * draws
    observed = torch.stack([counts[b].sum() for b in bins] + [draws - sum(counts[b].sum() for b in bins)])
    return float(((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum())
