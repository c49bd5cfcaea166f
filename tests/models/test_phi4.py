"""Phi-4-mini and Phi-4 shapes: transformers parity from the HF folder and from GGUF, llama.cpp agreement.

Tiny random configs (tests/helpers/tiny_models.py PHI4_VARIANTS): Phi-4-mini combines partial rotary 0.75,
LongRoPE (crossover at 32 tokens), a tied head and GQA with an o200k-style BPE tokenizer; Phi-4 is GQA with
rope_theta 250000 and a cl100k-style BPE tokenizer shipped as a GPT-2 tokenizer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import slmkit
from tests.helpers.gguf_models import hf_to_gguf
from tests.helpers.tiny_models import PHI4_VARIANTS, make_phi4_folder

ATOL = 1e-4
# Vowel signs are \p{M}: the o200k regex keeps them inside a word (transformers, and us); llama.cpp's own regex
# engine splits there, so this text is checked against transformers only.
DEVANAGARI = "हिन्दी पाठ। नमस्ते दुनिया"
TEXTS = [
    "Hello world", "Don't SHOUT, it's LOUD'S fault. We've 12345 items; 3.14159 /path/to/file.txt",
    "Schöne Grüße aus München! Die Straße ist nass, Ärger über Öl.",
    "你好，世界。東京は日本の首都です。我们今天学习语言模型。", "Привет, как дела? Ελληνικά. العربية نص.", DEVANAGARI,
    "I love pizza 🍕 and crabs 🦀🦀 😀! Café ☕ naïve résumé", "\nline\n\nbreaks\n\t tab  two  spaces   ",
    "def add(a, b):\n    return a + b  # sum", "<|user|>Hi<|end|><|assistant|>",
    "<|im_start|>user<|im_sep|>Hi<|im_end|>",
    "<think>Let me think.</think>The answer is 42.", '<|tool_call|>[{"name": "f", "arguments": {}}]<|/tool_call|>',
]


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            folder = make_phi4_folder(tmp_path_factory.mktemp(variant), variant)
            built[variant] = (folder, hf_to_gguf(folder, folder.parent / f"{variant}.gguf"))
        return built[variant]

    return get


@pytest.fixture(params=sorted(PHI4_VARIANTS))
def variant(request):
    return request.param


def hf_model(folder):
    from transformers import Phi3ForCausalLM

    return Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def ids_of(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("form", ["hf", "gguf"])
def test_logits_match_transformers_across_the_crossover(phi4, variant, form):
    folder, gguf_path = phi4(variant)
    llm = slmkit.load(folder if form == "hf" else gguf_path, dtype="float32")
    ref = hf_model(folder)
    for n in (20, 80):  # Phi-4-mini: 80 > original_max 32, the long factors
        ids = ids_of(n, llm.engine.vocab_size)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        ours = llm.logits(ids)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= ATOL


def test_gguf_without_output_ties_the_head(phi4):
    from slmkit.gguf import open_gguf

    folder, path = phi4("phi4-mini")
    assert "output.weight" not in open_gguf(path).tensors
    model = slmkit.load(path, dtype="float32").engine.model
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("form", ["hf", "gguf"])
def test_greedy_64_tokens_match_transformers_generate(phi4, variant, form):
    folder, gguf_path = phi4(variant)
    llm = slmkit.load(folder if form == "hf" else gguf_path, dtype="float32")
    ref = hf_model(folder)
    ref.generation_config.eos_token_id = None
    prompt = ids_of(20, llm.engine.vocab_size, seed=2)  # Phi-4-mini: 84 tokens in all, past the crossover
    with torch.no_grad():
        x = torch.tensor([prompt])
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False)[0, 20:]
    out = llm.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True)
    assert len(set(theirs.tolist())) > 4, "degenerate reference output makes this test weak"
    assert out.token_ids == theirs.tolist()


def test_tokenizer_ids_equal_transformers_and_llama_cpp(phi4, variant):
    from transformers import AutoTokenizer

    llama_cpp = pytest.importorskip("llama_cpp")
    folder, gguf_path = phi4(variant)
    hf = AutoTokenizer.from_pretrained(folder)
    ours_hf = slmkit.load(folder, dtype="float32").tokenizer
    ours_gguf = slmkit.load(gguf_path, dtype="float32").tokenizer
    cpp = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    for text in TEXTS:
        want = hf.encode(text, add_special_tokens=False)
        assert ours_hf.encode(text, add_special_tokens=False) == want, text
        assert ours_gguf.encode(text, add_special_tokens=False) == want, text
        if text != DEVANAGARI:
            assert list(cpp.tokenize(text.encode(), add_bos=False, special=True)) == want, text


def test_llama_cpp_agrees_on_the_gguf(phi4, variant):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, path = phi4(variant)
    llm = slmkit.load(path, dtype="float32")
    ids = ids_of(48, llm.engine.vocab_size, seed=5)  # past Phi-4-mini's crossover
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    ref.eval(ids)
    theirs = torch.tensor(np.array(ref.scores[: len(ids)]))
    ours = llm.logits(ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.95
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()


def test_batched_rows_across_the_crossover_equal_solo_runs(phi4):
    import threading

    llm = slmkit.load(phi4("phi4-mini")[0], dtype="float32")  # original_max 32: rows cross it on their own
    reqs = [(ids_of(n, llm.engine.vocab_size, seed=10 + n), m) for n, m in [(20, 30), (31, 5), (40, 8), (10, 12)]]
    solo = [llm.generate(p, max_new_tokens=m, temperature=0, ignore_eos=True).token_ids for p, m in reqs]
    llm.enable_batching(slots=4, context=128)
    got: list = [None] * len(reqs)

    def run(i: int) -> None:
        got[i] = llm.generate(reqs[i][0], max_new_tokens=reqs[i][1], temperature=0, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo


def test_int8_quant_stays_close(phi4, variant):
    folder, _ = phi4(variant)
    ref, q = slmkit.load(folder, dtype="float32"), slmkit.load(folder, dtype="float32", quant="int8")
    ids = ids_of(48, ref.engine.vocab_size, seed=7)
    a, b = ref.logits(ids), q.logits(ids)
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])  # K-quants need rows of 256 (hidden is 128)
def test_quantized_gguf_matches_transformers_on_its_dequantized_weights(phi4, variant, qtype, tmp_path):
    """The 8- and 4-bit GGUF forms (Phi-4-mini: no output.weight, the head is the quantized embedding): exact
    against transformers holding the file's dequantized weights; the packed-kernel run (quant auto) close."""
    from tests.engine.test_gguf_load import reference

    folder, _ = phi4(variant)
    path = hf_to_gguf(folder, tmp_path / f"{qtype}.gguf", qtype=qtype)
    ids = ids_of(48, 704, seed=7)
    with torch.no_grad():
        theirs = reference(folder, path)(torch.tensor([ids])).logits[0]
    exact = slmkit.load(path, dtype="float32", quant="none").logits(ids)
    assert (exact - theirs).abs().max().item() <= ATOL
    packed = slmkit.load(path, dtype="float32").logits(ids)
    assert (packed.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
