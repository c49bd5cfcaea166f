"""LLM.processor: a prompt with <|image_N|> tags and its images as generate() / logits() take them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import UnsupportedInputError
from .text.chat import check_text

if TYPE_CHECKING:
    from .api import LLM


def check_images(name: str, takes_images: bool | None, *, model_type: str | None = None,
                 param: str = "messages") -> None:
    """The one refusal of image parts for a text-only model (takes_images False; None: not known
    yet, so not refused). Called where images were found: LLM.render, and the server before it
    fetches any image for a model it has not loaded."""
    if takes_images is False:
        kind = f" ({model_type})" if model_type else ""
        raise UnsupportedInputError(f"model {name!r}{kind} is text-only and cannot take image parts", param=param)


class Processor:
    """The model's multimodal processor (a vision model's), or plain tokenization for a text-only one."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def __call__(self, prompt: str, images: Any = None, *, num_crops: int | None = None) -> Any:
        llm = self.llm
        check_text(prompt, "prompt")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if llm.capabilities.images and llm.capabilities.token_ids:
            return llm.backend.process(prompt, images, num_crops)
        if images:
            raise UnsupportedInputError(f"model {llm.name!r} ({llm.backend.model_type}) is text-only and cannot "
                                        "take images", param="images")
        if num_crops is not None:
            raise UnsupportedInputError(f"model {llm.name!r} takes no images", param="num_crops")
        from .vision.phi3v import MultimodalInputs

        ids = llm.encode_prompt(prompt)
        return MultimodalInputs(torch.tensor(ids, dtype=torch.long), None, None, [])
