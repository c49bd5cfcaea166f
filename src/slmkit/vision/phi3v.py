"""The Phi-3 / Phi-3.5-vision image processor and prompt ids, as the reference (HF-hub
``image_processing_phi3_v.py`` / ``processing_phi3_v.py``; facts in shared/specs/phi-family.md §4).

Per image: the HD transform (landscape transpose, the largest ``scale`` with
``scale * ceil(scale / ratio) <= num_crops``, bilinear resize to ``int(scale*336)`` wide, white padding of the
height to a multiple of 336, centred with ``top = int((tar - h) / 2)``, transpose back), ToTensor + CLIP
normalisation, a bicubic 336x336 global image of the *normalised* HD tensor, then the 336x336 crops in
row-major order; zero frames pad every image to ``num_crops + 1``.

One deliberate difference: an image so thin that the reference's resized height ``int(new_w / ratio)``
is 0 (e.g. 2000x1 with num_crops 1) fails in the reference (PIL refuses a 0-pixel resize); here that
height is 1 pixel, padded to 336 as any other.

Prompt ids: the text is split at ``<|image_N|>`` tags, each chunk tokenized on its own with the
tokenizer's special tokens (so a BOS starts every chunk when the tokenizer adds one), and tag k becomes
``num_image_tokens[k-1]`` copies of ``-k``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slmkit.checks import check_int, shown
from slmkit.errors import ConfigError, InvalidRequestError, ModelFileError
from slmkit.loading.files import read_json

from .images import ImageSource, load_images

if TYPE_CHECKING:
    from slmkit.text.tokenizer import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP = 336  # CLIP ViT-L/14-336 input side
MAX_CROPS = 64
DEFAULT_NUM_CROPS = 4  # without preprocessor_config.json (Phi-3.5-vision's value)
TAG = re.compile(r"<\|image_\d+\|>")  # the reference's pattern


def hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    """§4 step 1: img (RGB) resized to at most hd_num crops of 336 and padded with white to whole crops."""
    hd_num = check_int(hd_num, "num_crops", lo=1, hi=MAX_CROPS)
    width, height = img.size
    transposed = width < height
    if transposed:  # work on the landscape form
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = max(1, int(new_w / ratio))  # the reference fails on 0 here (see the module docstring)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # = torchvision's resize of a PIL image
    tar = math.ceil(new_h / CROP) * CROP
    padded = Image.new("RGB", (new_w, tar), (255, 255, 255))
    padded.paste(img, (0, int((tar - new_h) / 2)))  # bottom gets the rest
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def num_image_tokens(height: int, width: int) -> int:
    """Tokens of one image whose padded HD image is height x width: (h_c*w_c+1)*144 + 1 + (h_c+1)*12."""
    for name, v in (("height", height), ("width", width)):
        check_int(v, name, lo=CROP, what=f"a positive multiple of {CROP}")
        if v % CROP:
            raise InvalidRequestError(f"must be a positive multiple of {CROP}, got {v}", param=name)
    h_c, w_c = height // CROP, width // CROP
    return (h_c * w_c + 1) * 144 + 1 + (h_c + 1) * 12


def _normalized(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize of an RGB image: [3, H, W] float32."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return t.sub(mean).div(std)


def preprocess(images: Sequence[Image.Image], num_crops: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values [n, num_crops+1, 3, 336, 336] float32, image_sizes [n, 2] long (h, w), tokens per image)."""
    num_crops = check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)
    pixel_values = torch.zeros(len(images), num_crops + 1, 3, CROP, CROP)
    sizes, tokens = [], []
    for i, img in enumerate(images):
        hd = _normalized(hd_transform(img.convert("RGB"), num_crops))  # [3, h, w]
        h, w = hd.shape[1:]
        pixel_values[i, 0] = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic")[0]  # the global image
        crops = hd.reshape(3, h // CROP, CROP, w // CROP, CROP).permute(1, 3, 0, 2, 4).reshape(-1, 3, CROP, CROP)
        pixel_values[i, 1:1 + crops.shape[0]] = crops  # row-major; the rest stay zero
        sizes.append([h, w])
        tokens.append(num_image_tokens(h, w))
    return pixel_values, torch.tensor(sizes, dtype=torch.long).reshape(-1, 2), tokens


@dataclass
class MultimodalInputs:
    input_ids: torch.Tensor  # [len] long; image k's placeholders are -k (the reference's ids), k = 1..n
    pixel_values: torch.Tensor | None  # [n_images, num_crops+1, 3, 336, 336] float32; None without images
    image_sizes: torch.Tensor | None  # [n_images, 2] long: (h, w) of the padded HD image
    num_image_tokens: list[int]  # per image
    num_crops: int | None = None

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.input_ids > -1000000  # as the reference


def _tag_numbers(tags: list[str]) -> list[int]:
    return [int(t[len("<|image_"):-len("|>")]) for t in tags]


class Phi3VProcessor:
    """prompt with <|image_N|> tags + images -> MultimodalInputs, as the reference processor."""

    def __init__(self, tokenizer: Tokenizer, *, num_crops: int = DEFAULT_NUM_CROPS):
        self.tokenizer = tokenizer
        self.num_crops = check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer: Tokenizer) -> Phi3VProcessor:
        """num_crops from the folder's preprocessor_config.json ("num_crops"; 4 when the file or key is absent)."""
        path = Path(folder) / "preprocessor_config.json"
        cfg: Any = read_json(path, required=False)
        if cfg is None:
            return cls(tokenizer)
        if not isinstance(cfg, dict):
            raise ModelFileError(path, f"must be a JSON object, got {type(cfg).__name__}")
        n = cfg.get("num_crops", DEFAULT_NUM_CROPS)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CROPS:
            raise ConfigError("num_crops", f"must be an integer in [1, {MAX_CROPS}], got {shown(n)}", path=path)
        return cls(tokenizer, num_crops=n)

    def __call__(self, prompt: str, images: Sequence[ImageSource] | ImageSource | None = None, *,
                 num_crops: int | None = None) -> MultimodalInputs:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"must be a string, got {type(prompt).__name__}", param="prompt")
        crops = self.num_crops if num_crops is None else check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)
        if images is None:
            images = []
        elif isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)):
            images = [images]  # one image
        if not isinstance(images, Sequence):
            raise InvalidRequestError(f"must be a list of images, got {type(images).__name__}", param="images")
        numbers = _tag_numbers(TAG.findall(prompt))
        unique = sorted(set(numbers))
        n = len(images)
        if unique != list(range(1, len(unique) + 1)):
            raise InvalidRequestError(
                f"image tags must be numbered <|image_1|> to <|image_n|> without gaps; the prompt has "
                f"{len(unique)} distinct tags numbered {_listed(unique)} and {n} images were given", param="prompt")
        if len(unique) != n:
            span = f" (<|image_1|> to <|image_{len(unique)}|>)" if unique else ""
            raise InvalidRequestError(f"the prompt has {len(unique)} image tags{span} but {n} images were given: "
                                      "each image needs its tag <|image_k|> in the prompt", param="images")
        pixel_values = image_sizes = None
        tokens: list[int] = []
        if n:
            pixel_values, image_sizes, tokens = preprocess(load_images(images), crops)  # type: ignore[arg-type]
        ids: list[int] = []
        for i, chunk in enumerate(TAG.split(prompt)):
            ids += self.tokenizer.encode(chunk, add_special_tokens=True)  # BOS per chunk, as the reference
            if i < len(numbers):
                k = numbers[i]
                ids += [-k] * tokens[k - 1]
        return MultimodalInputs(torch.tensor(ids, dtype=torch.long), pixel_values, image_sizes, tokens,
                                crops if n else None)


def _listed(numbers: list[int]) -> str:
    text = ", ".join(shown(k) for k in numbers[:8])
    return text + (", ..." if len(numbers) > 8 else "") if numbers else "(none)"
