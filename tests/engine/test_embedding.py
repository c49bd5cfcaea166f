"""llm.embed: mean-pooled, L2-normalised final hidden states, batched equal to one at a time, on every
native architecture and the transformers backend; limits refused with typed errors."""
from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.engine.embedding import MAX_BATCH_TOKENS, batches
from slmkit.errors import ContextLengthError, InvalidRequestError, UnsupportedByBackendError

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog. " * 3, "x", "a b c d e f g"]


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    folder = make_phi3_folder(tmp_path_factory.mktemp("embed_phi"), "longrope")  # switch at 32 tokens
    return folder, slmkit.load(folder, dtype="float32")


def _reference(folder, texts):
    """The definition, from transformers' own model: the base model's last_hidden_state (after the
    final norm) averaged over each text's tokens, scaled to unit norm."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = slmkit.load(folder, dtype="float32").tokenizer
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t)])
            h = hf.base_model(input_ids=ids).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    return torch.stack(rows)


def test_embed_is_the_documented_pooling_and_batched_equals_one_at_a_time(phi):
    folder, llm = phi
    texts = [*TEXTS, "word " * 40]  # the last is past LongRoPE's switch: it runs in a batch of its own
    e = llm.embed(texts)
    assert e.shape == (len(texts), 64) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(texts)))
    one = torch.cat([llm.embed(t) for t in texts])
    torch.testing.assert_close(e, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e, _reference(folder, texts), atol=2e-4, rtol=1e-3)
    assert not torch.allclose(e[0], e[1], atol=1e-3)  # different texts, different vectors


def test_identical_texts_have_cosine_one_and_token_ids_equal_text(phi):
    _, llm = phi
    e = llm.embed(["same text here", "same text here", "something else entirely"])
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(e[0] @ e[2]) < 0.9999
    ids = llm.tokenizer.encode("same text here")
    torch.testing.assert_close(llm.embed(ids), e[:1])  # a list of token ids is one input
    torch.testing.assert_close(llm.embed([ids, ids]), e[:2])


def test_batches_are_sorted_bounded_and_do_not_straddle_the_rope_switch():
    lengths = [40, 3, 33, 10, 32, 5000, 1]
    groups = list(batches(lengths, split_at=32, max_tokens=100))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest <= 100
        assert len({lengths[i] <= 32 for i in g}) == 1
    assert [6, 1, 3] in groups or any({6, 1, 3} <= set(g) for g in groups)
    many = list(batches([7] * 3000))
    assert all(len(g) * 7 <= MAX_BATCH_TOKENS for g in many)


@pytest.mark.parametrize("arch", ["gemma3", "phi3_v"])
def test_other_architectures_batch_equal_one_at_a_time(arch, tmp_path):
    from tests.helpers.tiny_models import make_gemma3_folder, make_phi3v_folder

    folder = make_gemma3_folder(tmp_path / "g") if arch == "gemma3" else make_phi3v_folder(tmp_path / "v")
    llm = slmkit.load(folder, dtype="float32")
    assert llm.backend.model_type.startswith(arch)  # gemma3_text: the text-only config
    e = llm.embed(TEXTS)
    torch.testing.assert_close(e, torch.cat([llm.embed(t) for t in TEXTS]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(TEXTS)))


def test_transformers_backend_matches_native(phi):
    folder, llm = phi
    tf = slmkit.load(folder, backend="transformers", dtype="float32")
    assert tf.capabilities.embeddings
    torch.testing.assert_close(tf.embed(TEXTS), llm.embed(TEXTS), atol=2e-4, rtol=1e-3)


def test_limits_and_bad_inputs_are_typed_errors_naming_the_field(phi):
    _, llm = phi
    limit = llm.context_length
    with pytest.raises(ContextLengthError) as e:
        llm.embed(["ok", "word " * (limit + 10)])
    assert e.value.param == "texts[1]" and e.value.limit == limit
    with pytest.raises(ContextLengthError, match="at least"):  # refused before tokenizing megabytes
        llm.embed("w" * 50_000_000)
    cut = llm.embed(["word " * (limit + 10)], truncate=True)
    assert cut.shape == (1, 64)
    torch.testing.assert_close(cut, llm.embed([llm.tokenizer.encode("word " * (limit + 10))[:limit]]))
    cases = [([], "texts", "empty"), (["a"] * 2049, "texts", "2048"), (["a", ""], "texts[1]", "empty"),
             (["a", [1, 2]], "texts[1]", "mixes"), ([[1, 2], [10**9]], "texts[1]", "vocabulary"),
             (3.5, "texts", "must be a string"), ([{"a": 1}], "texts[0]", "must be a string"),
             (["\ud800"], "texts[0]", "surrogate")]
    for texts, param, words in cases:
        with pytest.raises(InvalidRequestError, match=words) as err:
            llm.embed(texts)
        assert err.value.param == param, (texts, err.value)
    with pytest.raises(InvalidRequestError, match="300000 tokens"):
        llm.embed([[5] * limit] * (300_000 // limit + 1))
    with pytest.raises(InvalidRequestError, match="truncate"):
        llm.embed("a", truncate="yes")


def test_a_backend_without_embeddings_refuses_embed_by_name(phi):
    import dataclasses

    _, llm = phi

    class NoEmbed:
        def __init__(self, inner):
            self.inner = inner
            self.capabilities = dataclasses.replace(inner.capabilities, embeddings=False, backend="llamacpp")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    other = slmkit.LLM(NoEmbed(llm.backend))
    with pytest.raises(UnsupportedByBackendError) as e:
        other.embed("hi")
    assert e.value.param == "embed" and "llamacpp" in str(e.value)
