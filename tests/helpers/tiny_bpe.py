"""Tiny byte-level BPE tokenizers in the two Phi-4 styles, written as real tokenizer.json folders.

"o200k": Phi-4-mini's style (GPT-4o's split regex with case-aware words and `\\p{N}{1,3}`, `<|system|>`...
`<|end|>` tags, `<|tool|>` / `<|tool_call|>` tags, its chat template with tools in the system turn).
"cl100k": Phi-4's style (GPT-4's split regex, `<|im_start|>role<|im_sep|>...<|im_end|>`), shipped like Phi-4
as a GPT-2 tokenizer class. Both: a Split pre-tokenizer then ByteLevel without its own regex, BPE merges
trained here on a small multilingual corpus, added tokens after the base vocabulary. Deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.helpers.tiny_tokenizer import _CORPUS

O200K_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CL100K_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}"
    "{{ eos_token }}{% endif %}"
)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
STYLES = {
    "o200k": dict(regex=O200K_RE, template=PHI4_MINI_TEMPLATE, eos="<|endoftext|>", end="<|end|>",
                  added=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>",
                         "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>")),
    "cl100k": dict(regex=CL100K_RE, template=PHI4_TEMPLATE, eos="<|endoftext|>", end="<|im_end|>",
                   added=("<|endoftext|>", "<|fim_prefix|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>",
                          "<think>", "</think>")),
}
_EXTRA = ["Don't SHOUT, it's LOUD'S fault. We've 12345 items; 3.14159 /path/to/file.txt\n\n  indented\tTab",
          "Привет, как дела? Всё хорошо. Ελληνικά γράμματα. العربية نص. हिन्दी पाठ।",
          "<think>Let me think step by step.</think>The answer is 42.",
          '[{"name": "get_weather", "arguments": {"city": "Paris"}}]']


def build_bpe_tokenizer(folder: Path, style: str = "o200k", vocab_size: int = 640) -> dict[str, int]:
    """Write tokenizer.json / tokenizer_config.json / special_tokens_map.json; return the added tokens' ids."""
    spec = STYLES[style]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(str(spec["regex"])), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tk.train_from_iterator(list(_CORPUS) + _EXTRA, trainer=trainer)
    added = list(spec["added"])
    special = [t for t in added if t not in ("<think>", "</think>")]
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in special])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in added if t not in special])
    tk.save(str(folder / "tokenizer.json"))
    ids = {t: int(tk.token_to_id(t)) for t in added}
    decoder = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": t in special} for t in added}
    config = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
              "bos_token": spec["eos"], "eos_token": spec["end"],
              "pad_token": spec["eos"], "unk_token": spec["eos"], "chat_template": spec["template"],
              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    smap = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(smap), encoding="utf-8")
    return ids


def bpe_gguf_metadata(folder: Path, *, style: str, vocab_size: int) -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes it for a byte-level BPE folder: model "gpt2",
    pre "gpt-4o" (o200k) or "dbrx" (cl100k, as the converter's hash table names Phi-4's), merges, token types
    (added specials control), rows up to vocab_size padded."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [3 if t in specials else (4 if i >= len(data["model"]["vocab"]) else 1) for i, t in enumerate(tokens)]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    spec = STYLES[style]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o" if style == "o200k" else "dbrx",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab[str(spec["eos"])],
            "tokenizer.ggml.eos_token_id": vocab[str(spec["end"])],
            "tokenizer.ggml.padding_token_id": vocab[str(spec["eos"])], "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": spec["template"]}
    return meta
