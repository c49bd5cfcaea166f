"""Tokenizer: a `tokenizers.Tokenizer` plus the HF folder semantics transformers 5 applies on top of it.

What `from_folder` reproduces (checked against `transformers.AutoTokenizer` 5.24 by tests/engine/test_tokenizer.py):

* ``tokenizer_config.json`` ``added_tokens_decoder`` flags (rstrip, lstrip, normalized, single_word, special) override
  the flags in ``tokenizer.json`` (Phi-3 June: rstrip on ``<|user|>`` etc. eats the "\\n" after the tag).
* BOS/EOS: text is encoded without the post-processor, then ``bos``/``eos`` are added when ``add_bos``/``add_eos``.
  Those come from ``add_bos_token``/``add_eos_token`` in tokenizer_config.json, else from whether the tokenizer.json
  ``TemplateProcessing`` single template starts with the BOS / ends with the EOS token. (transformers 5 itself ignores
  the config keys whenever tokenizer.json exists and only uses the post-processor; the shipped Phi files agree.)
* The pre-tokenization pipeline transformers 5 picks. For ``tokenizer_class: LlamaTokenizer`` it does *not* use the
  ``Prepend("▁")+Replace`` normalizer of tokenizer.json but rebuilds a ``Metaspace(prepend_scheme="first")`` pipeline
  (no "▁" after special tokens, no extra "▁" before leading spaces), except for model types it forces onto
  tokenizer.json as shipped (``phi3``, ``phi3_v``, ``phimoe`` via config.json). ``pipeline="file"`` always uses the
  tokenizer.json pipeline as shipped (what tokenizers, llama.cpp and ONNX Runtime GenAI do).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

from slmkit.checks import check_int
from slmkit.errors import ConfigError, InvalidRequestError, ModelFileError
from slmkit.loading.files import read_json

# config.json model types for which transformers 5 loads tokenizer.json as shipped even when tokenizer_config.json
# says LlamaTokenizer (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS list, restricted to the families slmkit runs).
_AS_SHIPPED_MODEL_TYPES = frozenset({"phi3", "phi3_v", "phimoe"})
_FLAG_KEYS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_LONG_TEXT = 16384  # characters: longer texts tokenize without holding the GIL


def _token_str(value: Any) -> str | None:
    """A special-token entry as stored in HF configs: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _has_type(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_has_type(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, type_name) for v in node)
    return False


def _template_edges(post_processor: Any) -> tuple[str | None, str | None]:
    """(first, last) SpecialToken ids of the TemplateProcessing single template, searching Sequence processors."""
    if not isinstance(post_processor, dict):
        return None, None
    if post_processor.get("type") == "Sequence":
        for sub in post_processor.get("processors", []):
            edges = _template_edges(sub)
            if edges != (None, None):
                return edges
        return None, None
    single = post_processor.get("single") if post_processor.get("type") == "TemplateProcessing" else None
    if not single:
        return None, None

    def special(piece: Any) -> str | None:
        return piece.get("SpecialToken", {}).get("id") if isinstance(piece, dict) else None

    return special(single[0]), special(single[-1])


class TokenizerStream:
    """Incremental detokenizer: emits only complete text (no U+FFFD from a partial UTF-8 byte sequence).

    Prefix/read-offset method: decode a small window of ids twice (without and with the new ids) and emit the new
    suffix, holding it back while it ends in U+FFFD (or, after a byte-fallback piece ``<0xNN>``, holds any U+FFFD:
    the character is not complete yet). A complete character is emitted at once, so a loop without ``flush()``
    (ORT GenAI style) prints the last emoji too. For valid UTF-8 output the concatenation of every ``decode`` result
    plus ``flush()`` equals ``Tokenizer.decode(all_ids)``. Only invalid byte runs differ: the ByteFallback decoder
    turns a whole run into U+FFFDs once any byte is invalid, after its valid characters were already emitted.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all ids; the next id starts a new text."""
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the first id whose text was already emitted in the previous step
        self._read = 0  # ids before this have been emitted

    def _pending(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def prime(self, ids: Sequence[int], keep: int = 8) -> None:
        """Start after `ids` (e.g. the prompt) without emitting them: the first new token is decoded in
        their context, so a SentencePiece word piece keeps its leading space ("▁and" -> " and")."""
        self.reset()
        tail = [int(i) for i in ids[-keep:]]
        while tail and tail[0] in self._tok.byte_piece_ids:  # never start inside a byte-fallback run
            tail.pop(0)
        self._ids, self._prefix, self._read = tail, 0, len(tail)

    def decode(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        token_id = self._tok._check_id(token_id)
        self._ids.append(token_id)
        if self._skip and token_id in self._tok.special_ids:
            return ""  # a skipped token adds no text and does not end a byte run
        text = self._pending()
        if not text or text.endswith("\ufffd") or (token_id in self._tok.byte_piece_ids and "\ufffd" in text):
            return ""  # an incomplete (or so far invalid) byte-fallback character waits for more bytes
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # keep the window small: drop ids no longer needed
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return text

    def flush(self) -> str:
        """Return any held-back text (e.g. an incomplete byte sequence, as U+FFFD) and reset."""
        text = self._pending()
        self.reset()
        return text


class Tokenizer:
    """Encode/decode/stream with HF-compatible BOS/EOS, added-token flags and chat template."""

    def __init__(self, tk: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
                 source: str | Path | None = None):
        tk.no_truncation()
        tk.no_padding()
        self._tk = tk
        self.vocab_size: int = tk.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id: int | None = tk.token_to_id(bos_token) if bos_token else None
        self.eos_token_id: int | None = tk.token_to_id(eos_token) if eos_token else None
        for flag, token, tid in (("add_bos_token", bos_token, self.bos_token_id),
                                 ("add_eos_token", eos_token, self.eos_token_id)):
            if (add_bos if flag == "add_bos_token" else add_eos) and tid is None:
                raise ConfigError(flag, f"token {token!r} is not in the vocabulary", path=source)
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template
        self.special_ids: set[int] = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._stream: TokenizerStream | None = None
        self._byte_ids: frozenset[int] | None = None
        # a BPE model's inputs where this tokenizer was built from them (GGUF metadata): tokens in id order,
        # merges, options; the GGUF load cache stores them instead of parsing the model's JSON back
        self.bpe_parts: tuple[list[str], list[tuple[str, str]], dict[str, Any]] | None = None

    @property
    def byte_piece_ids(self) -> frozenset[int]:
        """Ids of the ``<0xNN>`` pieces of a byte-fallback BPE model (empty for other models)."""
        if self._byte_ids is None:
            ids: set[int] = set()
            if getattr(self._tk.model, "byte_fallback", False):
                vocab = self._tk.get_vocab(with_added_tokens=False)
                ids = {vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}
            self._byte_ids = frozenset(ids)
        return self._byte_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (already patched with the config's added-token flags)."""
        return self._tk

    @classmethod
    def from_tokenizer(cls, tk: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                       add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None) -> Tokenizer:
        """Wrap an already-built tokenizer (e.g. one built from GGUF metadata)."""
        return cls(tk, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos, add_eos=add_eos,
                   chat_template=chat_template)

    @classmethod
    def from_folder(cls, path: str | Path, *, pipeline: Literal["auto", "file"] = "auto") -> Tokenizer:
        """Load tokenizer.json (+ optional tokenizer_config.json, special_tokens_map.json, chat template files).

        pipeline="auto" picks the pre-tokenization pipeline transformers 5 would (see the module docstring);
        "file" always uses tokenizer.json's own normalizer/pre-tokenizer/decoder.
        """
        folder = Path(path)
        tk_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        ranks_files = sorted(folder.glob("*.tiktoken"))
        if not tk_path.is_file() and ranks_files:
            return cls._from_tiktoken(folder, ranks_files[0])
        data = read_json(tk_path, required=True)
        cfg = read_json(cfg_path, required=False) or {}
        smap = read_json(folder / "special_tokens_map.json", required=False) or {}
        for p, obj in ((tk_path, data), (cfg_path, cfg), (folder / "special_tokens_map.json", smap)):
            if not isinstance(obj, dict):
                raise ModelFileError(p, "expected a JSON object")
        try:
            tk = tokenizers.Tokenizer.from_str(tk_path.read_text(encoding="utf-8"))
        except Exception as e:  # the Rust side raises plain Exception for any schema error
            raise ModelFileError(tk_path, f"not a valid tokenizers file: {e}") from e
        if pipeline == "auto" and _transformers_rebuilds_llama(data, cfg, folder):
            _use_transformers_llama_pipeline(tk, legacy=bool(cfg.get("legacy", False)),
                                             add_prefix_space=cfg.get("add_prefix_space") is not False)
        _apply_added_token_flags(tk, cfg.get("added_tokens_decoder"), cfg_path)

        # transformers reads special_tokens_map.json only when tokenizer_config.json has no added_tokens_decoder.
        names = dict(cfg) if "added_tokens_decoder" in cfg else {**cfg, **smap}
        _mark_named_tokens_special(tk, names)
        bos, eos = _token_str(names.get("bos_token")), _token_str(names.get("eos_token"))
        first, last = _template_edges(data.get("post_processor"))
        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        return cls(tk, bos_token=bos, eos_token=eos,
                   add_bos=add_bos if isinstance(add_bos, bool) else (bos is not None and first == bos),
                   add_eos=add_eos if isinstance(add_eos, bool) else (eos is not None and last == eos),
                   chat_template=_load_chat_template(folder, cfg), source=cfg_path)

    @classmethod
    def _from_tiktoken(cls, folder: Path, ranks_file: Path) -> Tokenizer:
        """A folder with a tiktoken ranks file instead of tokenizer.json (Phi-3-small): the BPE built
        from the ranks plus the added tokens tokenizer_config.json lists (else Phi-3-small's)."""
        from .tiktoken_file import PHI3_SMALL_SPECIALS, read_ranks, tokenizer_from_ranks

        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path, required=False) or {}
        if not isinstance(cfg, dict):
            raise ModelFileError(cfg_path, "expected a JSON object")
        listed = cfg.get("added_tokens_decoder") or {}
        specials: dict[int, str] = {}
        for key, entry in (listed.items() if isinstance(listed, dict) else ()):
            content = _token_str(entry)
            if not (isinstance(key, str) and key.isdigit()) or content is None:
                raise ModelFileError(cfg_path, f"added_tokens_decoder entry {key!r} is not an id with a content")
            specials[int(key)] = content
        tk = tokenizer_from_ranks(read_ranks(ranks_file), specials or PHI3_SMALL_SPECIALS)
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        add_bos = cfg.get("add_bos_token")
        return cls(tk, bos_token=bos or "<|endoftext|>", eos_token=eos or "<|endoftext|>",
                   add_bos=add_bos if isinstance(add_bos, bool) else False,
                   chat_template=_load_chat_template(folder, cfg), source=cfg_path)

    # -- encode / decode -------------------------------------------------------------------------------------------
    def _check_id(self, token_id: object) -> int:
        return check_int(token_id, "ids", lo=0, hi=2**32 - 1, what="token ids: non-negative integers")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, BOS/EOS are added per add_bos/add_eos."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"must be a string, got {type(text).__name__}", param="text")
        if len(text) > _LONG_TEXT:  # encode_batch releases the GIL (encode holds it): other threads, the
            ids = self._tk.encode_batch([text], add_special_tokens=False)[0].ids  # server's loop, run meanwhile
        else:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (ids outside the vocabulary, e.g. padded embedding rows, decode to nothing)."""
        return self._tk.decode([self._check_id(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:  # noqa: A002 - contract name
        return self._tk.id_to_token(int(id))

    # -- streaming ---------------------------------------------------------------------------------------------------
    def create_stream(self, skip_special_tokens: bool = True) -> TokenizerStream:
        """A new independent incremental decoder."""
        return TokenizerStream(self, skip_special_tokens)

    def stream_decode(self, token_id: int) -> str:
        """Incrementally decode with the tokenizer's default stream (skips special tokens)."""
        if self._stream is None:
            self._stream = self.create_stream()
        return self._stream.decode(token_id)

    def reset_stream(self) -> None:
        if self._stream is not None:
            self._stream.reset()


def _transformers_rebuilds_llama(data: dict, cfg: dict, folder: Path) -> bool:
    """Whether transformers 5 AutoTokenizer would load this folder as a rebuilt `LlamaTokenizer`."""
    model_cfg = read_json(folder / "config.json", required=False)
    model_cfg = model_cfg if isinstance(model_cfg, dict) else {}
    declared = str(cfg.get("tokenizer_class") or model_cfg.get("tokenizer_class") or "").removesuffix("Fast")
    byte_level = _has_type(data.get("pre_tokenizer"), "ByteLevel") or _has_type(data.get("decoder"), "ByteLevel")
    return (declared == "LlamaTokenizer" and not byte_level and (data.get("model") or {}).get("type") == "BPE"
            and model_cfg.get("model_type") not in _AS_SHIPPED_MODEL_TYPES)


def _use_transformers_llama_pipeline(tk: tokenizers.Tokenizer, *, legacy: bool, add_prefix_space: bool) -> None:
    """Replace the normalizer/pre-tokenizer/decoder the way transformers 5 `LlamaTokenizer.__init__` rebuilds them."""
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)


def _apply_added_token_flags(tk: tokenizers.Tokenizer, decoder_cfg: Any, cfg_path: Path) -> None:
    """Re-add each added token of tokenizer_config.json with its flags; its id must not change."""
    if not isinstance(decoder_cfg, dict):
        return
    entries: list[tuple[int, dict]] = []
    for key, entry in decoder_cfg.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ModelFileError(cfg_path, f"added_tokens_decoder key {key!r} is not an integer id") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ModelFileError(cfg_path, f"added_tokens_decoder[{key}] has no string 'content'")
        entries.append((idx, entry))
    for idx, entry in sorted(entries, key=lambda e: e[0]):
        flags = {k: bool(entry[k]) for k in _FLAG_KEYS if k in entry}
        token = AddedToken(entry["content"], **flags)
        if flags.get("special", False):
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
        got = tk.token_to_id(entry["content"])
        if got != idx:
            raise ModelFileError(cfg_path, f"added token {entry['content']!r} has id {idx} here but {got} in "
                                           "tokenizer.json")


def _mark_named_tokens_special(tk: tokenizers.Tokenizer, names: dict) -> None:
    """Like transformers: every named token (``*_token`` keys, extra/additional_special_tokens) that is in the
    vocabulary is special, whatever its added-token entry says (Phi-3-vision's eos ``</s>``). Absent ones are not
    added (transformers would append them after the vocabulary)."""
    named = [v for k, v in names.items() if k.endswith("_token")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = names.get(key)
        named += list(extra.values()) if isinstance(extra, dict) else list(extra) if isinstance(extra, list) else []
    existing = {t.content: t for t in tk.get_added_tokens_decoder().values()}
    for content in {c for c in map(_token_str, named) if c}:
        tid = tk.token_to_id(content)
        old = existing.get(content)
        if tid is None or (old is not None and old.special):
            continue
        flags = {k: getattr(old, k) for k in _FLAG_KEYS[:4]} if old is not None else {"normalized": False}
        tk.add_special_tokens([AddedToken(content, special=True, **flags)])
        assert tk.token_to_id(content) == tid


def _load_chat_template(folder: Path, cfg: dict) -> str | None:
    """chat_template.jinja wins (as in transformers), then tokenizer_config.json, then chat_template.json."""
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(jinja_path, f"cannot read: {e}") from e
    template = cfg.get("chat_template")
    if template is None:
        stored = read_json(folder / "chat_template.json", required=False)
        template = stored.get("chat_template") if isinstance(stored, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
