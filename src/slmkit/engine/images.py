"""Images inside the engine: each image of a prompt becomes an ImageEntry, keyed by its content,
and its j-th token the negative id `-(key << 20 | j) - 1`. Sequences, sessions, the server's
prompt cache and the batch engine's kept slots compare token ids, so a repeated image (the next
turn of a conversation about it) matches and its keys/values are reused; an entry computes its
features (the vision tower, the model's `encode_image`) at most once, when a forward pass first
needs them, and the store keeps recent entries so a new request with the same image does not
re-encode it either. Users only see the reference's -k placeholders (MultimodalInputs.input_ids).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidRequestError

TOKEN_BITS = 20  # tokens per image < 2**20; keys < 2**40, so ids stay within int64
MAX_IMAGE_TOKENS = 2**TOKEN_BITS
KEY_BITS = 40


def image_token_id(key: int, j: int) -> int:
    return -((key << TOKEN_BITS) | j) - 1


def split_image_id(token_id: int) -> tuple[int, int]:
    """(key, index within the image) of an engine image-token id (a negative int)."""
    x = -token_id - 1
    return x >> TOKEN_BITS, x & (MAX_IMAGE_TOKENS - 1)


@dataclass(eq=False)
class ImageEntry:
    key: int
    pixel_values: torch.Tensor | None  # [frames, 3, 336, 336]; dropped once the features exist
    image_size: tuple[int, int]  # padded HD (h, w)
    n_tokens: int
    features: torch.Tensor | None = None  # [n_tokens, hidden], computed once
    store: ImageStore | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ids(self) -> list[int]:
        return [image_token_id(self.key, j) for j in range(self.n_tokens)]

    def embeddings(self, model: Any) -> torch.Tensor:
        with self.lock:  # two requests with one image: the tower runs once
            if self.features is None:
                assert self.pixel_values is not None
                feats = model.encode_image(self.pixel_values, self.image_size)
                if feats.shape[0] != self.n_tokens:
                    raise InvalidRequestError(f"the image gives {feats.shape[0]} tokens but its prompt holds "
                                              f"{self.n_tokens} placeholders", param="images")
                self.features, self.pixel_values = feats, None
                if self.store is not None:
                    self.store.encoded += 1
            return self.features


def content_key(pixels: torch.Tensor, size: tuple[int, int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{size[0]}x{size[1]}:{tuple(pixels.shape)}:{pixels.dtype}".encode())
    h.update(pixels.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") % ((1 << KEY_BITS) - 1) + 1


class ImageStore:
    """Recent images by content key (at most `capacity`), so a later request reuses the features."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: OrderedDict[int, ImageEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # images that went through the tower (for tests and stats)

    def entry(self, pixels: torch.Tensor, size: tuple[int, int], n_tokens: int) -> ImageEntry:
        key = content_key(pixels, size)
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found.n_tokens == n_tokens:
                self._entries.move_to_end(key)
                return found
            e = ImageEntry(key, pixels, size, n_tokens, store=self)
            self._entries[key] = e
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return e


def attach(store: ImageStore, input_ids: Sequence[int], pixel_values: torch.Tensor | None, image_sizes: Any,
           num_image_tokens: Sequence[int]) -> tuple[list[int], dict[int, ImageEntry]]:
    """A prompt's ids with the placeholders (-k: image k, 1-based) replaced by engine image ids, and
    its images by key. Each run of -k must hold image k's token count (a multiple of it, for a tag
    repeated back to back)."""
    n = len(num_image_tokens)
    if n and (pixel_values is None or image_sizes is None or len(pixel_values) != n or len(image_sizes) != n):
        raise InvalidRequestError(f"{n} images' token counts but pixel_values / image_sizes for "
                                  f"{0 if pixel_values is None else len(pixel_values)}", param="pixel_values")
    entries: list[ImageEntry] = []
    for k in range(n):
        count = int(num_image_tokens[k])
        if not 0 < count < MAX_IMAGE_TOKENS:
            raise InvalidRequestError(f"image {k + 1} has {count} tokens", param="num_image_tokens")
        assert pixel_values is not None and image_sizes is not None
        h, w = (int(x) for x in image_sizes[k])
        entries.append(_store_entry(store, pixel_values[k], (h, w), count))
    out: list[int] = []
    run_image, run_len = 0, 0
    for i in list(input_ids) + [0]:  # a sentinel ends the last run
        if isinstance(i, bool) or not isinstance(i, int):
            raise InvalidRequestError(f"token ids must be integers, got {type(i).__name__}", param="input_ids")
        if i < 0:
            k = -i
            if k > n:
                raise InvalidRequestError(f"placeholder {i} refers to image {k}, but there are {n} images",
                                          param="input_ids")
            if run_image not in (0, k):
                _close_run(entries[run_image - 1], run_image, run_len)
                run_len = 0
            run_image = k
            out.append(image_token_id(entries[k - 1].key, run_len % entries[k - 1].n_tokens))
            run_len += 1
            continue
        if run_image:
            _close_run(entries[run_image - 1], run_image, run_len)
            run_image, run_len = 0, 0
        out.append(i)
    out.pop()
    return out, {e.key: e for e in entries}


def _store_entry(store: ImageStore, pixels: torch.Tensor, size: tuple[int, int], n_tokens: int) -> ImageEntry:
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        raise InvalidRequestError("each image's pixel_values must be a [frames, 3, H, W] tensor", param="pixel_values")
    return store.entry(pixels, size, n_tokens)


def _close_run(entry: ImageEntry, k: int, length: int) -> None:
    if length % entry.n_tokens:
        raise InvalidRequestError(f"image {k} takes {entry.n_tokens} placeholder tokens, the prompt has a run of "
                                  f"{length}", param="input_ids")


def check_ids(ids: Sequence[int], images: Mapping[int, ImageEntry], vocab_size: int, param: str) -> None:
    """Engine image ids must name an attached image and a token within it."""
    for i in ids:
        if i < 0:
            key, j = split_image_id(i)
            e = images.get(key)
            if e is None or j >= e.n_tokens:
                raise InvalidRequestError(f"token id {i} is neither in the vocabulary [0, {vocab_size}) nor a "
                                          "token of an image of this prompt", param=param)


def merge_embeddings(model: Any, ids: torch.Tensor, images: Mapping[int, ImageEntry]) -> torch.Tensor:
    """The input embeddings of ids [B, S]: text tokens from the embedding table, image tokens from
    their image's features."""
    h = model.embed_text(ids.clamp_min(0))
    neg = (ids < 0).nonzero().tolist()
    if not neg:
        return h
    by_key: dict[int, list[tuple[int, int, int]]] = {}
    for b, s in neg:
        key, j = split_image_id(int(ids[b, s]))
        by_key.setdefault(key, []).append((b, s, j))
    for key, where in by_key.items():
        entry = images.get(key)
        if entry is None:
            raise InvalidRequestError("a prompt's image token has no image attached", param="input_ids")
        feats = entry.embeddings(model)
        rows = torch.tensor([w[0] for w in where]), torch.tensor([w[1] for w in where])
        h[rows] = feats[torch.tensor([w[2] for w in where])].to(h.dtype)
    return h
