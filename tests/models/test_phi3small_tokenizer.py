"""Phi-3-small's tokenizer: a folder with `cl100k_base.tiktoken` (no tokenizer.json) loads as a
`tokenizers` BPE that encodes exactly as tiktoken. The real cl100k file cannot be downloaded here,
so the reference is tiktoken itself (its own cl100k_base definition: regex and special ids) over a
ranks file trained in the test; skipped where tiktoken is not installed."""
from __future__ import annotations

import base64
import json

import pytest

import slmkit.text.tiktoken_file as tf
from slmkit.errors import ModelFileError
from slmkit.text.tokenizer import Tokenizer
from tests.helpers.tiny_tokenizer import _CORPUS

tiktoken = pytest.importorskip("tiktoken")

TEXTS = _CORPUS + [
    "  leading spaces and trailing   ", "tabs\tand\r\nwindows newlines\n\n\nand more\n", "It's we'LL they'Re I'M",
    "12345678 3.14159 1,000,000", "émigré naïve façade Ελληνικά русский текст עברית العربية हिन्दी",
    "🍕🍕 emoji 👩‍👩‍👧 zwj", "<|user|>\nHi<|end|>\n<|assistant|>\n", "x" * 50, "!!!???...;;;", "",
]


def trained_ranks(n_merges=600):
    """A small cl100k-style rank table: the 256 bytes, then tokens from a byte-level BPE trained on a
    multilingual corpus (pre-split with tiktoken's cl100k regex), each rank the order of its merge."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tf.CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_CORPUS * 3, trainers.BpeTrainer(
        vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    unshow = {c: b for b, c in tf._byte_to_unicode().items()}
    merges = json.loads(tk.to_str())["model"]["merges"]
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        tok = bytes(unshow[c] for c in a + b)
        ranks.setdefault(tok, len(ranks))
    return ranks


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    ranks = trained_ranks()
    d = tmp_path_factory.mktemp("phi3small_tok")
    (d / "cl100k_base.tiktoken").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return d, ranks, Tokenizer.from_folder(d)


def reference(ranks, monkeypatch):
    """tiktoken's own cl100k_base definition (regex, specials) over our ranks, plus Phi-3-small's
    chat tokens at their ids."""
    import tiktoken_ext.openai_public as pub

    monkeypatch.setattr(pub, "load_tiktoken_bpe", lambda *a, **k: ranks)
    spec = pub.cl100k_base()
    specials = {**spec["special_tokens"], "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
                "<|end|>": 100266}
    return tiktoken.Encoding("cl100k_test", pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=specials)


def test_encodes_like_tiktoken_on_multilingual_text(folder, monkeypatch):
    _, ranks, ours = folder
    ref = reference(ranks, monkeypatch)
    for text in TEXTS:
        expected = ref.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text
    assert max(len(ref.encode(t)) for t in _CORPUS) < max(len(t.encode()) for t in _CORPUS)  # merges did work


def test_special_ids_and_template_tokens(folder):
    tok = folder[2]
    assert tok.token_to_id("<|endoftext|>") == 100257 == tok.eos_token_id
    assert tok.token_to_id("<|end|>") == 100266 and tok.token_to_id("<|endofprompt|>") == 100276
    assert tok.encode("<|user|>\nHi<|end|>", add_special_tokens=False)[0] == 100262
    assert tok.decode([100262, 100266], skip_special_tokens=True) == ""


def test_bad_ranks_file_is_a_model_file_error(tmp_path):
    (tmp_path / "cl100k_base.tiktoken").write_text("not-base64!! 3\n")
    with pytest.raises(ModelFileError, match="line 1"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "cl100k_base.tiktoken").write_text("QQ== 0\n")
    with pytest.raises(ModelFileError, match="single byte"):
        Tokenizer.from_folder(tmp_path)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{'<|' + m['role'] + '|>' + '\\n' + m['content'] + '<|end|>\\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


def test_a_phi3small_folder_with_only_the_tiktoken_file_chats(folder, tmp_path):
    """The real folder's shape: config vocab 100352, cl100k ranks, specials from the fixed table,
    the §2 chat template; stops on <|end|> and <|endoftext|>."""
    import slmkit
    from tests.models.test_phi3small import make_folder

    d = make_folder(tmp_path / "m", "8k", vocab=100352, end=100257)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["dummy_token_indices"]  # as in the real config.json
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "cl100k_base.tiktoken").write_text((folder[0] / "cl100k_base.tiktoken").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                         "chat_template": TEMPLATE}))
    llm = slmkit.load(d, dtype="float32")
    assert {100257, 100266} <= llm.engine.eos_token_ids
    dummies = llm.engine.model.args.dummy_ids  # none listed in config.json: the padding ids of the tokenizer
    assert dummies[:3] == [100256, 100264, 100265] and 100266 not in dummies and dummies[-1] == 100351
    prompt = llm.render([{"role": "user", "content": "Hi there"}]).text
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[:2] == [100257, 100262] and ids[-2:] == [100263, folder[2].encode("\n", add_special_tokens=False)[0]]
    out = llm.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=5, temperature=0)
    assert 1 <= len(out.token_ids) <= 5 and all(t < 100352 - 20 for t in out.token_ids)
