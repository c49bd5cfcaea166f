"""Beam search: the same sequences and scores as transformers' generate(num_beams=...)."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit import InvalidRequestError

PROMPT = [5, 9, 14, 22, 9, 14, 31, 40]


def hf_beams(folder, eos, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT]), do_sample=False, output_scores=True, return_dict_in_generate=True,
                         eos_token_id=eos, pad_token_id=0, **kw)
    seqs = []
    for row in out.sequences[:, len(PROMPT):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut])
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("kw", [
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.7, max_new_tokens=12),
    dict(num_beams=3, num_return_sequences=3, length_penalty=1.5, max_new_tokens=10, early_stopping=True),
    dict(num_beams=2, num_return_sequences=1, length_penalty=1.0, max_new_tokens=8, early_stopping="never"),
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, max_new_tokens=12, repetition_penalty=1.3,
         no_repeat_ngram_size=2),  # logits processors run on the beams' log-probabilities
])
def test_beams_match_transformers(phi3_folders, kw):
    folder = phi3_folders("gqa")
    llm = slmkit.load(folder, dtype="float32")
    # a frequent token as an extra end-of-sequence id, so that beams really finish early
    greedy = llm.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    eos = sorted(set(llm.engine.eos_token_ids) | {greedy[3]})
    from slmkit.engine.beam import beam_search

    ours = beam_search(llm.engine, PROMPT, eos_ids=eos, **kw)
    seqs, scores = hf_beams(folder, eos, **kw)
    assert [b.token_ids for b in ours] == seqs
    assert all(abs(b.score - s) < 1e-4 for b, s in zip(ours, scores)), ([b.score for b in ours], scores)
    assert any(b.finish_reason == "stop" for b in ours) or kw["num_beams"] == 2


def test_beam_search_api_and_errors(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    beams = llm.beam_search("Hello", num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert len(beams) == 2 and beams[0].score >= beams[1].score and isinstance(beams[0].text, str)
    for kw, param in [({"num_beams": 0}, "num_beams"), ({"num_return_sequences": 5}, "num_return_sequences"),
                      ({"early_stopping": "sometimes"}, "early_stopping"), ({"length_penalty": "x"}, "length_penalty")]:
        with pytest.raises(InvalidRequestError) as e:
            llm.beam_search("Hello", **kw)
        assert e.value.param == param
