"""Tokenizer from GGUF metadata that reproduces llama.cpp's tokenization (its `llama-vocab.cpp`).

``tokenizer_from_gguf_metadata(meta)`` takes the GGUF key/value metadata as plain Python values (lists or numpy
arrays for arrays) and returns a `slmkit.text.tokenizer.Tokenizer` over a `tokenizers.Tokenizer`.

``tokenizer.ggml.model == "llama"`` (SentencePiece BPE: Llama 2, Phi-3, Gemma 3). llama.cpp's SPM tokenizer splits
out every control/user-defined/unknown token found in the text (longest token first), prefixes a raw-text fragment
with "▁" when ``add_space_prefix`` (default true) and the fragment starts the text or follows a token, replaces " "
with "▁", and then, starting from single characters, repeatedly merges the adjacent pair whose concatenation is a
vocabulary piece with the highest score (ties: leftmost); characters that end up in no piece become ``<0xNN>`` byte
tokens. Here that is a byte-fallback `BPE` whose merges are every split ``(left, right)`` of every piece into two
pieces, ranked by the piece's score (then piece id, left id, right id, like transformers' SentencePiece and GGUF
converters); normalizer ``[Prepend("▁")] + Replace(" ", "▁")``; decoder ``Replace("▁", " ") + ByteFallback + Fuse
[+ Strip(1 leading space)]``; the control (3) and unknown (2) tokens are special added tokens and the user-defined
(4) ones plain added tokens, all matched on the raw text. Known, rare differences from llama.cpp: when two
different splits that form the same piece (or two pieces with equal scores) compete in one word, BPE picks the
lower rank and SPM the leftmost; llama.cpp splits out overlapping added tokens longest-first, tokenizers leftmost-
longest; the Phi-3 rstrip below strips C ``isspace`` there and Unicode whitespace here.

``tokenizer.ggml.model == "gpt2"`` (byte-level BPE with ``tokenizer.ggml.merges``): the pre-tokenizer regexes
llama.cpp uses for the common ``tokenizer.ggml.pre`` values (GPT-2, Llama 3 / DBRX (cl100k, Phi-4),
GPT-4o (o200k, Phi-4-mini), Qwen 2, StarCoder/SmolLM, default)
plus ByteLevel; ``ignore_merges`` for Llama 3. Other pre-tokenizers and tokenizer models raise
`UnsupportedModelError`. Decoding is plain ByteLevel (llama.cpp's ``clean_spaces`` post-pass is not applied).

llama.cpp behaviour reproduced from outside the tokenizer keys, so pass the whole metadata: a model whose
``general.name`` contains "phi-3"/"phi3" (case-insensitive) gets rstrip on every control/user-defined/unknown token
except ``<unk>``, ``<s>``, ``<|endoftext|>`` (and on ``</s>``), which drops whitespace after ``<|user|>`` etc.; the
jina-v2 pre-tokenizers get lstrip on ``<mask>``; tokens whose text llama.cpp treats as end-of-generation (``<|end|>``,
``<end_of_turn>``, ...) or fill-in-the-middle become control tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.text.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp `llama_token_type`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MATCHED_IN_TEXT = (UNKNOWN, CONTROL, USER_DEFINED)  # llama.cpp `cache_special_tokens`

# Texts llama.cpp forces to control type whatever the file says (its EOG list, llama-vocab.cpp `load`).
_EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                        "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})
# ... and the auto-detected EOT/FIM tokens, only when the matching id key is absent.
_DETECTED_CONTROL = {
    "tokenizer.ggml.eot_token_id": ("<｜end▁of▁sentence｜>",),
    "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                                        "▁<PRE>", "<|code_prefix|>"),
    "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                                        "▁<SUF>", "<|code_suffix|>"),
    "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                                        "▁<MID>", "<|code_middle|>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}
_HARMONY_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})  # gpt-oss hack

# gpt2-style pre-tokenizer regexes, as llama.cpp's `llm_tokenizer_bpe` lists them per `tokenizer.ggml.pre`.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
_GPT4O_RE = _CASED + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # o200k (Phi-4-mini)
_DEFAULT_RES = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")
# pre name -> (regexes, ignore_merges, default add_bos)
_BPE_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _spec in (
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ((_LLAMA3_RE,), True, True)),
    (("dbrx", "smaug-bpe"), ((_LLAMA3_RE,), False, False)),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "mpt",
      "olmo", "jais", "trillion", "granite-docling", "exaone4"), ((_GPT2_RE,), False, False)),
    (("gpt-4o",), ((_GPT4O_RE,), False, False)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2"), ((_QWEN2_RE,), False, False)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
     ((r"\p{N}", _GPT2_RE), False, False)),
    (("default",), (_DEFAULT_RES, False, False)),
):
    for _name in _names:
        _BPE_PRE[_name] = _spec


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """A Tokenizer that encodes like llama.cpp for this GGUF metadata (see the module docstring).

    Raises ConfigError (naming the key) for missing or malformed tokenizer metadata and UnsupportedModelError for a
    tokenizer model or gpt2 pre-tokenizer this module does not implement.
    """
    if not isinstance(meta, Mapping):
        raise ConfigError("tokenizer.ggml.model", f"GGUF metadata must be a mapping, not {type(meta).__name__}")
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ConfigError("tokenizer.ggml.model", "missing (the GGUF file has no tokenizer)")
    if not isinstance(model, str):
        raise ConfigError("tokenizer.ggml.model", f"expected a string, got {type(model).__name__}")
    if model not in ("llama", "gpt2"):
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported (supported: 'llama', 'gpt2')")

    tokens, vocab = _tokens(meta)
    types = _token_types(meta, tokens, vocab)
    bos_default, eos_default = (1, 2) if model == "llama" else (None, None)
    bos_id = _token_id(meta, "tokenizer.ggml.bos_token_id", len(tokens), bos_default)
    eos_id = _token_id(meta, "tokenizer.ggml.eos_token_id", len(tokens), eos_default)

    if model == "llama":
        tk, merges, options = _spm_tokenizer(meta, tokens, vocab)
        add_bos_default = True
    else:
        tk, merges, options, add_bos_default = _bpe_tokenizer(meta, tokens, vocab)
    _add_text_matched_tokens(tk, meta, tokens, types)

    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ConfigError("tokenizer.chat_template", f"expected a string, got {type(template).__name__}")
    for key, tid, flag, wanted in (("tokenizer.ggml.bos_token_id", bos_id, "add_bos_token", add_bos),
                                   ("tokenizer.ggml.eos_token_id", eos_id, "add_eos_token", add_eos)):
        if wanted and tid is None:
            raise ConfigError(key, f"missing, but tokenizer.ggml.{flag} is true")
    out = Tokenizer.from_tokenizer(tk, bos_token=None if bos_id is None else tokens[bos_id],
                                   eos_token=None if eos_id is None else tokens[eos_id],
                                   add_bos=add_bos, add_eos=add_eos, chat_template=template)
    if len(vocab) == len(tokens):  # tokens in id order: what the GGUF load cache stores (bpe_parts)
        out.bpe_parts = (tokens, merges, options)
    return out


# -- metadata ---------------------------------------------------------------------------------------------------------
def _array(meta: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise ConfigError(key, f"expected an array, got {type(value).__name__}")
    to_list = getattr(value, "to_list", None)  # the GGUF reader's string arrays (gguf/strings.py): decoded here
    return to_list() if callable(to_list) else value


def _tokens(meta: Mapping[str, Any]) -> tuple[list[str], dict[str, int]]:
    """The vocabulary (llama.cpp's renaming of empty tokens applied) and its index, token -> id."""
    key = "tokenizer.ggml.tokens"
    raw = _array(meta, key)
    if raw is None:
        raise ConfigError(key, "missing (the GGUF file has no vocabulary)")
    if len(raw) == 0:
        raise ConfigError(key, "the vocabulary is empty")
    tokens: list[str] = []
    if isinstance(raw, list) and set(map(type, raw)) == {str} and "" not in raw:
        tokens = list(raw)  # what the GGUF reader gives: checked at C speed (262k tokens)
    for i, t in enumerate(() if tokens else raw):
        if isinstance(t, (bytes, bytearray)):
            try:
                t = bytes(t).decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(key, f"token {i} is not valid UTF-8") from None
        if not isinstance(t, str):
            raise ConfigError(key, f"token {i} is a {type(t).__name__}, expected a string")
        tokens.append(t if t else f"[EMPTY_{i}]")  # llama.cpp renames empty tokens the same way
    vocab = dict(zip(tokens, range(len(tokens))))
    if len(vocab) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise ConfigError(key, f"token {t!r} appears twice (ids {seen[t]} and {i})")
            seen[t] = i
    return tokens, vocab


def _numbers(meta: Mapping[str, Any], key: str, n: int, kind: type) -> list | None:
    raw = _array(meta, key)
    if raw is None:
        return None
    if len(raw) != n:
        raise ConfigError(key, f"has {len(raw)} entries but tokenizer.ggml.tokens has {n}")
    try:
        values = [kind(v) for v in (raw.tolist() if hasattr(raw, "tolist") else raw)]
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"expected numbers: {e}") from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise ConfigError(key, "contains NaN or infinite values")
    return values


def _token_types(meta: Mapping[str, Any], tokens: list[str], index: Mapping[str, int]) -> list[int]:
    """Token types after llama.cpp's by-text overrides (missing key: all normal, as llama.cpp)."""
    types = _numbers(meta, "tokenizer.ggml.token_type", len(tokens), int) or [NORMAL] * len(tokens)
    forced = set(_EOG_TEXTS)
    for key, texts in _DETECTED_CONTROL.items():
        if key not in meta:
            forced.update(texts)
    for text in forced:
        if text in index:
            types[index[text]] = CONTROL
    for text in _HARMONY_USER_DEFINED:
        if text in index:
            types[index[text]] = USER_DEFINED
    if all(t in index for t in ("<|return|>", "<|call|>", "<|end|>")):
        types[index["<|end|>"]] = USER_DEFINED  # llama.cpp's o200k_harmony workaround
    return types


def _token_id(meta: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    value = meta.get(key)
    if value is None:
        return default if default is not None and default < n else None
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise ConfigError(key, f"expected an integer token id, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < n:
        raise ConfigError(key, f"token id {value} is outside the vocabulary (0..{n - 1})")
    return value


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    if value is None:
        return default
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()  # numpy bool
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected a boolean, got {type(value).__name__}")
    return value


# -- SentencePiece ("llama") ------------------------------------------------------------------------------------------
def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece/llama.cpp SPM scoring: every split of a piece into two pieces.

    Ranked by the piece's score (highest first), then piece id, left id, right id. Splits are found with
    vectorized 64-bit polynomial hashes of every prefix/suffix (each hit is then checked on the strings), so
    Gemma's 262,144 pieces take about a second; the plain loop is the fallback for very long pieces.
    """
    tokens = list(tokens)
    n = len(tokens)
    pid, left, right = _split_candidates(tokens)
    neg_scores = -np.asarray(scores, dtype=np.float64)
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), neg_scores))] = np.arange(n)
    order = np.lexsort((right, left, rank[pid]))
    return [(tokens[a], tokens[b]) for a, b in zip(left[order].tolist(), right[order].tolist())]


_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_MAX_HASHED_LEN = 64  # longer pieces go through the plain loop (keeps the code-point matrix small)


def _split_candidates(tokens: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(piece, left, right) id arrays of every split piece == left + right with all three in the vocabulary.

    Vectorized over pieces, one split position k at a time: look the 64-bit polynomial hashes of every k-prefix and
    its suffix up among the pieces' hashes, then keep the hits whose code points really match (so a hash collision
    can never produce a wrong merge; pieces sharing a hash fall back to the plain loop).
    """
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ids = np.flatnonzero(lengths <= _MAX_HASHED_LEN)
    ids = ids[np.argsort(-lengths[ids], kind="stable")]  # longest first: rows longer than k are a prefix
    lens = lengths[ids]
    width = int(lens[0]) if len(ids) else 0
    if width >= 2:
        # codes[k, row]: code point k of the row's piece (0 past its end)
        codes = np.array([tokens[i] for i in ids.tolist()], dtype=f"<U{width}")
        codes = np.ascontiguousarray(codes.view(np.uint32).reshape(len(ids), width).T)
        longer = np.searchsorted(-lens, -np.arange(width + 1), side="left")  # longer[k]: rows with length > k
        powers = np.ones(width + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(1, width + 1):
                powers[k] = powers[k - 1] * _HASH_BASE
            full = np.zeros(len(ids), dtype=np.uint64)
            for k in range(width):
                m = longer[k]
                full[:m] = full[:m] * _HASH_BASE + codes[k, :m]
            by_hash = np.argsort(full, kind="stable")
            sorted_full = full[by_hash]
            if np.any(sorted_full[1:] == sorted_full[:-1]):
                return _split_candidates_loop(tokens, range(len(tokens)))
            last = len(sorted_full) - 1
            prefix = np.zeros(len(ids), dtype=np.uint64)
            for k in range(1, width):
                m = longer[k]  # rows that can split after k code points
                if m == 0:
                    break
                prefix[:m] = prefix[:m] * _HASH_BASE + codes[k - 1, :m]
                pre = prefix[:m]
                suf = full[:m] - pre * powers[lens[:m] - k]
                at_pre = np.minimum(np.searchsorted(sorted_full, pre), last)
                at_suf = np.minimum(np.searchsorted(sorted_full, suf), last)
                rows = np.flatnonzero((sorted_full[at_pre] == pre) & (sorted_full[at_suf] == suf))
                a, b = by_hash[at_pre[rows]], by_hash[at_suf[rows]]
                exact = ((lens[a] == k) & (lens[b] == lens[rows] - k)
                         & (codes[:k, rows] == codes[:k, a]).all(axis=0)
                         & (codes[k:, rows] == codes[:width - k, b]).all(axis=0))
                found.append((ids[rows[exact]], ids[a[exact]], ids[b[exact]]))
    long_ids = np.flatnonzero(lengths > _MAX_HASHED_LEN).tolist()
    if long_ids:
        found.append(_split_candidates_loop(tokens, long_ids))
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    pid, left, right = (np.concatenate(parts).astype(np.int64) for parts in zip(*found))
    return pid, left, right


def _split_candidates_loop(tokens: list[str], ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {t: i for i, t in enumerate(tokens)}
    get = index.get
    out: list[tuple[int, int, int]] = []
    for pid in ids:
        piece = tokens[pid]
        for k in range(1, len(piece)):
            a = get(piece[:k])
            if a is not None:
                b = get(piece[k:])
                if b is not None:
                    out.append((pid, a, b))
    arr = np.array(out, dtype=np.int64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _spm_tokenizer(meta: Mapping[str, Any], tokens: list[str],
                   vocab: dict[str, int]) -> tuple[tokenizers.Tokenizer, list[tuple[str, str]], dict[str, Any]]:
    """The tokenizer, and its BPE model's merges and options."""
    scores = _numbers(meta, "tokenizer.ggml.scores", len(tokens), float)
    if scores is None:
        raise ConfigError("tokenizer.ggml.scores", "missing (a SentencePiece vocabulary needs its piece scores)")
    unk_id = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens), 0)
    merges = spm_merges(tokens, scores)
    options: dict[str, Any] = {"fuse_unk": True, "byte_fallback": True}
    if unk_id is not None:
        options["unk_token"] = tokens[unk_id]
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk, merges, options


# -- byte-level BPE ("gpt2") ------------------------------------------------------------------------------------------
def _bpe_tokenizer(meta: Mapping[str, Any], tokens: list[str], vocab: dict[str, int]
                   ) -> tuple[tokenizers.Tokenizer, list[tuple[str, str]], dict[str, Any], bool]:
    """The tokenizer, its BPE model's merges and options, and whether the pre-tokenizer adds BOS."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise ConfigError("tokenizer.ggml.pre", f"expected a string, got {type(pre).__name__}")
    if pre not in _BPE_PRE:
        raise UnsupportedModelError(f"GGUF tokenizer model 'gpt2' with pre-tokenizer {pre!r} is not supported "
                                    f"(supported: {', '.join(sorted(_BPE_PRE))})")
    regexes, ignore_merges, add_bos_default = _BPE_PRE[pre]
    key = "tokenizer.ggml.merges"
    raw = _array(meta, key)
    if raw is None:
        raise ConfigError(key, "missing (a gpt2 BPE vocabulary needs its merges)")
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        if isinstance(m, (bytes, bytearray)):
            m = bytes(m).decode("utf-8", errors="replace")
        if not isinstance(m, str):
            raise ConfigError(key, f"merge {i} is a {type(m).__name__}, expected a string")
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise ConfigError(key, f"merge {i} {m!r} has no space between its two parts")
        left, right = m[:cut], m[cut + 1:]
        if left in vocab and right in vocab and left + right in vocab:  # others can never yield a token
            merges.append((left, right))
    options = {"ignore_merges": ignore_merges}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk, merges, options, add_bos_default


# -- tokens llama.cpp splits out of the text --------------------------------------------------------------------------
def _add_text_matched_tokens(tk: tokenizers.Tokenizer, meta: Mapping[str, Any], tokens: list[str],
                             types: list[int]) -> None:
    """Control/unknown tokens as special added tokens, user-defined as plain ones, all matched on the raw text.

    Per-token strip flags as llama.cpp sets them by name: lstrip on ``<mask>`` for the jina-v2 pre-tokenizers;
    rstrip on all of them but ``<unk>``, ``<s>``, ``<|endoftext|>`` when ``general.name`` says Phi-3.
    """
    name, pre = meta.get("general.name"), meta.get("tokenizer.ggml.pre")
    jina = isinstance(pre, str) and any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
    phi3 = not jina and isinstance(name, str) and any(s in name.lower() for s in ("phi-3", "phi3"))
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for text, kind in zip(tokens, types):
        if kind not in _MATCHED_IN_TEXT:
            continue
        token = AddedToken(text, single_word=False, lstrip=jina and text == "<mask>",
                           rstrip=phi3 and text not in no_rstrip,
                           normalized=False, special=kind != USER_DEFINED)
        (plain if kind == USER_DEFINED else special).append(token)
    if special:
        tk.add_special_tokens(special)
    if plain:
        tk.add_tokens(plain)
