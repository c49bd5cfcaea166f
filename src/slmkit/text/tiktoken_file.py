"""A `tokenizers` byte-level BPE built from a tiktoken ranks file (Phi-3-small's `cl100k_base.tiktoken`).

A tiktoken file is one `base64(token bytes) rank` per line. tiktoken encodes a pre-token by merging,
again and again, the adjacent pair whose concatenation has the lowest rank (a pre-token that is a
whole token is taken as is). The same is a BPE whose vocabulary is the ranks (bytes shown through
GPT-2's byte-to-unicode table) and whose merges are every split (a, b) of each token into two
tokens, ordered by the rank of a + b; `ignore_merges` takes whole tokens as is. The split regex is
cl100k's. No tiktoken needed at run time (tests compare with it where it is installed).
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from ..errors import ModelFileError

# cl100k_base's pre-tokenizer regex as tiktoken 0.14 writes it, in Oniguruma's dialect (tokenizers'):
# `\z` for its `$` (end of text in Rust's regex, end of line in Oniguruma), and `\p{N}{1,3}` for its
# possessive `{1,3}+`, which Oniguruma reads as "one or more runs of 1-3 digits"
CL100K_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"
                  r"|\s++\z|\s*[\r\n]|\s+(?!\S)|\s")

# Phi-3-small's added tokens (spec phi-family.md §2; onnxruntime-extensions phi-3-small test data),
# used when the folder's tokenizer_config.json lists none
PHI3_SMALL_SPECIALS = {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
                       100260: "<|fim_suffix|>", 100261: "<|system|>", 100262: "<|user|>", 100263: "<|assistant|>",
                       100266: "<|end|>", 100276: "<|endofprompt|>"}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (what ByteLevel uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a .tiktoken file; ModelFileError naming the line at fault."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"cannot read the tiktoken ranks file ({e})") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64 rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ModelFileError(path, f"line {n} is not 'base64-token rank' ({e})") from None
        if rank < 0 or token in ranks or not token:
            raise ModelFileError(path, f"line {n}: bad or repeated token/rank {rank}")
        ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ModelFileError(path, f"has no rank for the single byte {missing[0]:#04x} ({len(missing)} missing)")
    if len(set(ranks.values())) != len(ranks):
        raise ModelFileError(path, "two tokens share a rank")
    return ranks


def tokenizer_from_ranks(ranks: dict[bytes, int], specials: dict[int, str],
                         pattern: str = CL100K_PATTERN) -> tokenizers.Tokenizer:
    """The `tokenizers` equivalent of tiktoken.Encoding(pattern, ranks, specials)."""
    show = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(show[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    model = BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True)
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    taken = set(ranks.values())
    clash = [i for i in specials if i in taken]
    if clash:
        raise ModelFileError("tokenizer_config.json", f"added token id {clash[0]} is also a BPE rank")
    # tokenizers numbers added tokens after the vocabulary in the order given: pad the gaps so each
    # special lands on its own id
    top = max(ranks.values())
    for i in sorted(specials):
        if i <= top:
            raise ModelFileError("tokenizer_config.json", f"added token id {i} is inside the BPE ranks")
        n = tk.get_vocab_size(with_added_tokens=True)
        tk.add_special_tokens([AddedToken(f"<|dummy_id_{j}|>", special=True, normalized=False) for j in range(n, i)]
                              + [AddedToken(specials[i], special=True, normalized=False)])
        if tk.token_to_id(specials[i]) != i:
            raise ModelFileError("tokenizer_config.json", f"added token {specials[i]!r} cannot take id {i}")
    return tk
