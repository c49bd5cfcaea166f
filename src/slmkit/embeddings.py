"""LLM.embed's request half: texts (or token ids) -> checked token-id rows within the limits, then
the backend's embed (capabilities.embeddings): mean-pooled, L2-normalised final hidden states.

What an embedding is (native engine and transformers backend alike): the model's hidden states
after its final norm (what lm_head reads), for each token of the text as the model tokenizes a
prompt (its BOS rule), averaged over those tokens and scaled to unit L2 norm; float32
[n_texts, hidden]. The cosine of two embeddings is their dot product. Texts run in right-padded
batches whose result equals one text at a time (engine/embedding.py). Limits: MAX_INPUTS texts and
MAX_TOTAL_TOKENS tokens per call (InvalidRequestError); a text longer than the model's context is
a ContextLengthError naming it, or cut to the context with truncate=True. Backends without
capabilities.embeddings (llama.cpp, ONNX, OpenVINO, MLX, QNN, clouds, a running Ollama) refuse
"embed" with UnsupportedByBackendError."""
from __future__ import annotations

from typing import Any

import torch

from .engine.engine import validate_token_ids
from .errors import ContextLengthError, InvalidRequestError, UnsupportedByBackendError

MAX_INPUTS = 2048  # texts in one call (OpenAI's limit for /v1/embeddings)
MAX_TOTAL_TOKENS = 300_000  # tokens of all texts in one call (OpenAI's limit): bounds one call's time
_SHRINK = 4  # a normalizer may compose up to this many characters into one (as api.py's bound)


def _is_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def split_inputs(texts: Any, param: str) -> list[tuple[str, Any]]:
    """texts as a list of (its name in errors, a str or a token-id list): a string, a list of
    strings, a list of token ids (one input) or a list of token-id lists."""
    if isinstance(texts, str) or _is_ids(texts):
        return [(param, texts)]
    if isinstance(texts, torch.Tensor):
        texts = texts.tolist() if texts.dim() in (1, 2) and not texts.is_floating_point() else None
        if isinstance(texts, list) and _is_ids(texts):
            return [(param, texts)]
    if not isinstance(texts, (list, tuple)):
        raise InvalidRequestError("must be a string, a list of strings, a list of token ids or a list of "
                                  f"token-id lists, got {type(texts).__name__}", param=param)
    if not texts:
        raise InvalidRequestError("must not be empty", param=param)
    if len(texts) > MAX_INPUTS:
        raise InvalidRequestError(f"has {len(texts)} inputs; at most {MAX_INPUTS} are allowed in one request",
                                  param=param)
    out = []
    for i, t in enumerate(texts):
        where = f"{param}[{i}]"
        if not isinstance(t, (str, list, tuple)):
            raise InvalidRequestError(f"must be a string or a list of token ids, got {type(t).__name__}", param=where)
        if isinstance(t, str) and isinstance(texts[0], (list, tuple)) or (
                not isinstance(t, str) and isinstance(texts[0], str)):
            raise InvalidRequestError("mixes strings and token-id lists; send one kind", param=where)
        out.append((where, t))
    return out


def rows_of(llm: Any, texts: Any, *, truncate: bool, param: str) -> list[list[int]]:
    """Each input's token ids (a text tokenized with the model's BOS rule), checked: not empty,
    valid ids, at most the context length (or cut to it with truncate), at most MAX_TOTAL_TOKENS
    in all."""
    limit, vocab = llm.context_length, llm.backend.vocab_size
    rows, total = [], 0
    for where, t in split_inputs(texts, param):
        if isinstance(t, str):
            if not t:
                raise InvalidRequestError("is an empty string", param=where)
            ids = _encode(llm, t, where, limit, truncate)
        else:
            ids = validate_token_ids(list(t), vocab, where)
        if len(ids) > limit:
            if not truncate:
                raise ContextLengthError(len(ids), limit, param=where)
            ids = ids[:limit]
        total += len(ids)
        if total > MAX_TOTAL_TOKENS:
            raise InvalidRequestError(f"has more than {MAX_TOTAL_TOKENS} tokens in all (the limit of one request); "
                                      "send fewer or shorter inputs", param=param)
        rows.append(ids)
    return rows


def _encode(llm: Any, text: str, where: str, limit: int, truncate: bool) -> list[int]:
    """A text's token ids; a text so long that it cannot fit whatever it tokenizes to is refused
    (or, with truncate, cut to what can hold the first `limit` tokens) before tokenizing."""
    from .text.chat import check_text

    check_text(text, where)
    longest = llm._longest_token()
    if truncate:
        text = text[: (limit + 1) * longest * _SHRINK]
    else:
        least = len(text) // (_SHRINK * longest)
        if least > limit:
            raise ContextLengthError(least, limit, at_least=True, param=where)
    return llm.tokenizer.encode(text, add_special_tokens=True)


def check_capable(llm: Any) -> None:
    caps = llm.capabilities
    if not caps.embeddings:
        raise UnsupportedByBackendError("embed", caps.backend, f"it gives no embeddings of {llm.name!r}")


def embed(llm: Any, texts: Any, *, truncate: bool = False, param: str = "texts") -> torch.Tensor:
    """LLM.embed (see there)."""
    check_capable(llm)
    if not isinstance(truncate, bool):
        raise InvalidRequestError(f"must be true or false, got {truncate!r}", param="truncate")
    rows = rows_of(llm, texts, truncate=truncate, param=param)
    return llm.backend.embed(rows)
