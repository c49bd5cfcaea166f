"""A loaded native model: forward passes, KV caches and the stop-token set. Generator drives it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checks import check_int
from ..errors import ContextLengthError, InvalidRequestError, UnsupportedInputError
from ..loading.hf import LoadedModel
from ..loading.packing import pack_linears
from ..models.cache import KVCache, SlotCache
from ..models.rope import Rope
from .images import ImageEntry, ImageStore, attach, check_ids, merge_embeddings


def _ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def validate_token_ids(ids: object, vocab_size: int, param: str) -> list[int]:
    """ids as a list of ints in [0, vocab_size), or InvalidRequestError naming `param` (floats are
    refused, not truncated; a 1-D integer tensor is accepted)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise InvalidRequestError("must be a 1-D integer tensor of token ids", param=param)
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise InvalidRequestError(f"must be a list of token ids, got {type(ids).__name__}", param=param)
    if not ids:
        raise InvalidRequestError("must not be empty", param=param)
    what = f"token ids: integers in the vocabulary [0, {vocab_size})"
    return [check_int(i, param, lo=0, hi=vocab_size - 1, what=what) for i in ids]


def stop_token_ids(tokenizer: Any, generation_config: dict, config_eos: object, vocab_size: int) -> frozenset[int]:
    """A model's end-of-sequence ids: generation_config's + config.json's + the tokenizer's eos, and
    <|end|> / <|endoftext|> / <end_of_turn> where the vocabulary has them (Phi's end of turn)."""
    ids = set(_ids(generation_config.get("eos_token_id")) + _ids(config_eos))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for special in ("<|end|>", "<|endoftext|>", "<end_of_turn>"):
        i = tokenizer.token_to_id(special)
        if i is not None:
            ids.add(i)
    return frozenset(i for i in ids if 0 <= i < vocab_size)


class Engine:
    def __init__(self, loaded: LoadedModel, *, pack: bool = True):
        self.model = loaded.model
        # bf16 on CPU: oneDNN-packed weights decode ~1.3x faster than F.linear (benchmarks/gemv.py)
        self.packed_linears = pack_linears(self.model) if pack else 0
        self.args = loaded.args
        self.tokenizer = loaded.tokenizer
        self.dtype, self.device, self.name = loaded.dtype, loaded.device, loaded.name
        self.generation_config = loaded.generation_config
        self.config = loaded.config
        self.gguf = loaded.gguf  # the open GGUF file (quantized blocks) for the quantization pass, if any
        self.model_type: str = loaded.args.model_type
        self.context_length: int = loaded.args.max_position_embeddings
        self.vocab_size: int = loaded.args.vocab_size
        self.eos_token_ids: frozenset[int] = frozenset(self._stop_ids())
        # LongRoPE: past this length a pass uses the long frequency set (None: no such switch)
        rope = self.model.rope
        assert isinstance(rope, Rope)  # each architecture's Model has its rope (models/phi3.py, models/gemma3.py)
        self.rope = rope
        self.rope_crossover: int | None = rope.crossover
        self.takes_images = callable(getattr(self.model, "encode_image", None))
        self.images = ImageStore()  # recent images' features, by content

    def attach_images(self, input_ids: Sequence[int], pixel_values: Any, image_sizes: Any,
                      num_image_tokens: Sequence[int]) -> tuple[list[int], dict[int, ImageEntry]]:
        """A multimodal prompt's ids (-k placeholders) as engine ids, and its images by key (engine/images.py)."""
        if not self.takes_images and (num_image_tokens or any(i < 0 for i in input_ids)):
            raise UnsupportedInputError(f"model {self.name!r} ({self.model_type}) is text-only and cannot take "
                                        "images", param="images")
        return attach(self.images, input_ids, pixel_values, image_sizes, num_image_tokens)

    def _run(self, ids: torch.Tensor, cache: Any, last_only: bool, images: Mapping[int, ImageEntry] | None
             ) -> torch.Tensor:
        if images and bool((ids < 0).any()):
            embeds = merge_embeddings(self.model, ids, images)
            return self.model(ids, cache, last_only=last_only, inputs_embeds=embeds)
        return self.model(ids, cache, last_only=last_only)

    def _stop_ids(self) -> set[int]:
        return set(stop_token_ids(self.tokenizer, self.generation_config, self.args.eos_token_id, self.vocab_size))

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch_size, a.num_key_value_heads, a.head_dim, capacity,
                       max_capacity=self.context_length, dtype=self.dtype, device=self.device)

    def check_ids(self, ids: Sequence[int], what: str = "input_ids") -> torch.Tensor:
        """Validate token ids (type, range) and return them as a [1, S] tensor."""
        return torch.tensor(validate_token_ids(ids, self.vocab_size, what), dtype=torch.long,
                            device=self.device).view(1, -1)

    def check_prompt_ids(self, ids: object, images: Mapping[int, ImageEntry] | None, what: str) -> list[int]:
        """validate_token_ids, where negative ids may also be tokens of the given images."""
        if not images:
            return validate_token_ids(ids, self.vocab_size, what)
        if isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point():
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not ids:
            return validate_token_ids(ids, self.vocab_size, what)  # names the problem
        image = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i < 0]
        check_ids(image, images, self.vocab_size, what)
        text = [i for i in ids if not (isinstance(i, int) and not isinstance(i, bool) and i < 0)]
        if text:
            validate_token_ids(text, self.vocab_size, what)
        return list(ids)

    def rope_regime(self, total_len: int) -> str:
        """The RoPE frequency set a pass over total_len tokens uses (cache entries must agree)."""
        return self.rope.regime(total_len)

    def rope_switches(self, total_len: int) -> bool:
        """True when a pass over total_len tokens uses other RoPE frequencies than passes over
        fewer did (LongRoPE past original_max): keys cached by those cannot serve it, so the whole
        sequence is run again in one pass (transformers' behaviour, and ours in Generator)."""
        return self.rope_crossover is not None and total_len > self.rope_crossover

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, *, last_only: bool = True,
                images: Mapping[int, ImageEntry] | None = None) -> torch.Tensor:
        """Run ids [B, S] after what the cache holds; returns float32 logits [B, S or 1, vocab].
        images: the entries of the image ids (negative) among ids, by key."""
        total = cache.offset + ids.shape[1]
        if total > self.context_length:
            raise ContextLengthError(total, self.context_length)
        cache.reserve(total)
        return self._run(ids, cache, last_only, images).float()

    @torch.inference_mode()
    def forward_slots(self, ids: torch.Tensor, cache: SlotCache, *, last_only: bool = True) -> torch.Tensor:
        """One step for every row in use of a slot cache (continuous batching), each at its own
        length: ids [n, S] (S = 1: a decode step; more: each row's pending token and its drafts,
        padded to S) -> float32 logits [n, vocab] at the last position, or with last_only=False
        [n, S, vocab]; every row's length advances by S (the caller rolls back what it rejects).
        The caller keeps each row within the slot capacity."""
        if cache.n == 1:  # alone: the plain one-row path (no per-row masks or indexed writes)
            view = cache.row_cache(0)
            logits = self.model(ids, view, last_only=last_only)
            cache.lens[0] = view.offset
        else:
            logits = self.model(ids, cache, last_only=last_only)  # the model advances the cache
        return logits.float()[:, -1] if last_only else logits.float()

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], images: Mapping[int, ImageEntry] | None = None) -> torch.Tensor:
        """Full forward without cache: float32 logits [len(ids), vocab] (image ids with `images`)."""
        t = torch.tensor(self.check_prompt_ids(ids, images, "input_ids"), dtype=torch.long,
                         device=self.device).view(1, -1)
        if t.shape[1] > self.context_length:
            raise ContextLengthError(t.shape[1], self.context_length)
        return self._run(t, None, False, images).float()[0]

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Full forward without cache of ids [B, S] (every row from position 0): the final-normed
        hidden states (what lm_head reads), float32 [B, S, hidden]."""
        if ids.shape[1] > self.context_length:
            raise ContextLengthError(ids.shape[1], self.context_length)
        return self.model(ids, None, hidden=True).float()

    def embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean-pooled, L2-normalised final hidden states of validated token-id rows: float32
        [len(rows), hidden] (engine/embedding.py: batched, equal to one row at a time)."""
        from .embedding import embed_rows

        return embed_rows(rows, self.hidden_states, split_at=self.rope_crossover, device=self.device)
