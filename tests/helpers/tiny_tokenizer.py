"""Build tiny, real Phi-3-style tokenizer folders (tokenizer.json + tokenizer_config.json + special_tokens_map.json).

The tokenizer is a Llama-2 SentencePiece-style byte-fallback BPE like Phi-3's: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the
256 ``<0xNN>`` byte pieces, then BPE pieces trained here on a small built-in multilingual corpus, then the Phi added
tokens at ``base+0 .. base+10`` (mirroring 32000..32010; the vision variant continues to ``<|image|>`` at base+44).
Per-variant flags (add_bos_token, rstrip on the tags, chat template) follow each model's tokenizer_config.json on the
Hugging Face Hub (copies in microsoft/onnxruntime-extensions test/data/phi-3*/). Deterministic; ~0.1 s.

``tokenizer.json`` mirrors the real Phi-3 files: the added tokens it lists carry the *April* flags (rstrip false), and
its post-processor adds ``<s>`` exactly when the variant's ``add_bos_token`` is true (like the shipped files, where the
two always agree). ``tokenizer_config.json``'s ``added_tokens_decoder`` carries the variant's real flags, so a loader
that ignores the config override gets the June/medium/3.5 rstrip behaviour wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

VARIANTS = ("phi3-mini-june", "phi3-mini-april", "phi3-medium", "phi3.5-mini", "phi3-vision")

_JUNE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_APRIL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
_MEDIUM = _APRIL.removeprefix("{{ bos_token }}")
_PHI35 = _JUNE.replace("{% if message['role'] == 'system' %}",
                       "{% if message['role'] == 'system' and message['content'] %}")
_VISION = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
TEMPLATES = {"phi3-mini-june": _JUNE, "phi3-mini-april": _APRIL, "phi3-medium": _MEDIUM, "phi3.5-mini": _PHI35,
             "phi3-vision": _VISION}

# Mostly English with some German, CJK and emoji. Characters absent from here (most CJK, most emoji) byte-fall-back.
_CORPUS = [
    "Hello, can you call some tools for me? Sure, I can calculate the sum for you!",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "System message. You are a helpful assistant. Answer the question of the user.",
    "What is the capital of France? The capital of France is Paris.",
    "Why is the sky blue? Because of Rayleigh scattering of the sunlight in the air.",
    "Tell me a story about a small language model that runs on a laptop.",
    "Guten Morgen! Wie geht es dir? Mir geht es gut, danke. Schöne Grüße aus München.",
    "Die Straße ist nass, weil es regnet. Ärger über Öl und Übermut.",
    "你好，世界。我们今天学习语言模型。今天天气很好。",
    "こんにちは世界。東京は日本の首都です。",
    "I love pizza 🍕 and coffee ☕ in the morning 😀.",
    "def add(a, b): return a + b; print(add(1, 2))",  # no "\n": like Llama, newline is the <0x0A> byte piece
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.",
]


def _trained_pieces(vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus (SentencePiece-style ▁ word starts) and return its pieces and merges in order."""
    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[])
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges  # type: ignore[return-value]


def _added_names(variant: str) -> list[str]:
    names = ["<|endoftext|>", "<|assistant|>"] + [f"<|placeholder{i}|>" for i in range(1, 5)]
    names += ["<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    if variant == "phi3-vision":
        names += [f"<|placeholder{i}|>" for i in range(7, 40)] + ["<|image|>"]
    return names


def _rstrip(variant: str, name: str) -> bool:
    if variant == "phi3-mini-april":
        return False
    if variant == "phi3-vision":
        return name not in ("<|system|>", "<|end|>", "<|user|>", "<|endoftext|>")
    return name != "<|endoftext|>"


def _flags(content: str, rstrip: bool, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def build_phi_tokenizer(folder: Path, variant: str = "phi3-mini-june", vocab_size_target: int = 512) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json of a tiny Phi-3 tokenizer to folder.

    The base vocabulary (model pieces, before the added tokens) has exactly vocab_size_target entries when that is
    at least 361 (3 + 256 byte pieces + the corpus alphabet); the added tokens follow at base+0, base+1, ...
    """
    if variant not in TEMPLATES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    add_bos = variant in ("phi3-mini-april", "phi3-vision")
    eos = "</s>" if variant == "phi3-vision" else "<|endoftext|>"

    pieces, merges = _trained_pieces(max(vocab_size_target - 259, 64))
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    while len(vocab) < vocab_size_target:  # the corpus ran out of merges: unreachable filler pieces
        vocab[f"▁<unused{len(vocab)}>"] = len(vocab)
    base = len(vocab)

    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
    else:
        tk.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>")])
    tk.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])
    names = _added_names(variant)
    # tokenizer.json keeps the April flags (rstrip false); tokenizer_config.json below overrides them per variant.
    tk.add_special_tokens([AddedToken(n, rstrip=False, normalized=False) for n in names])
    assert tk.token_to_id(names[-1]) == base + len(names) - 1, "added-token ids must follow the base vocab"
    tk.save(str(folder / "tokenizer.json"))

    decoder = {"0": _flags("<unk>", False, True), "1": _flags("<s>", False, True),
               "2": _flags("</s>", variant != "phi3-mini-april", False)}
    for i, n in enumerate(names):
        decoder[str(base + i)] = _flags(n, _rstrip(variant, n), True)
    config = {
        "add_bos_token": add_bos, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
        "chat_template": TEMPLATES[variant], "clean_up_tokenization_spaces": False, "eos_token": eos,
        "legacy": False, "model_max_length": 4096 if variant != "phi3-vision" else 131072,
        "pad_token": "<|endoftext|>", "padding_side": "right" if variant == "phi3-vision" else "left",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    smap = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            for k, v in (("bos_token", "<s>"), ("eos_token", eos), ("pad_token", "<|endoftext|>"),
                         ("unk_token", "<unk>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2), encoding="utf-8")


def write_model_config(folder: Path, variant: str) -> None:
    """A minimal config.json (model_type only). With it, transformers 5 loads tokenizer.json as shipped instead of
    rebuilding a LlamaTokenizer pipeline, as it does for real Phi-3 model folders."""
    model_type = "phi3_v" if variant == "phi3-vision" else "phi3"
    (Path(folder) / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")


def phi_special_ids(folder: Path) -> dict[str, int]:
    """Map every added-token content (``<s>``, ``<|end|>``, ``<|user|>``, ...) to its id, read from tokenizer.json."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["content"]: int(t["id"]) for t in data["added_tokens"]}
