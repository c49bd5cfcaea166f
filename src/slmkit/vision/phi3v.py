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
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slmkit.checks import check_int, shown
from slmkit.errors import ConfigError, ContextLengthError, InvalidRequestError, ModelFileError
from slmkit.loading.files import read_json

from .images import ImageSource, load_image

if TYPE_CHECKING:
    from slmkit.text.tokenizer import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP = 336  # CLIP ViT-L/14-336 input side
MAX_CROPS = 64
DEFAULT_NUM_CROPS = 4  # without preprocessor_config.json (Phi-3.5-vision's value)
MAX_LENGTH = 131072  # ids per prompt without config.json: Phi-3/3.5-vision's context
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


def _frames(img: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
    """(frames [1 + h_c*w_c, 3, 336, 336]: the global image then the crops in row-major order, [h, w])."""
    hd = _normalized(hd_transform(img if img.mode == "RGB" else img.convert("RGB"), num_crops))  # [3, h, w]
    h, w = hd.shape[1:]
    glob = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic")  # of the normalised tensor, as the reference
    crops = hd.reshape(3, h // CROP, CROP, w // CROP, CROP).permute(1, 3, 0, 2, 4).reshape(-1, 3, CROP, CROP)
    return torch.cat([glob, crops]), [h, w]


def _stack(frames: list[torch.Tensor], num_crops: int) -> torch.Tensor:
    """[n, num_crops+1, 3, 336, 336]: each image's frames, zero frames after them."""
    out = torch.zeros(len(frames), num_crops + 1, 3, CROP, CROP)
    for i, f in enumerate(frames):
        out[i, :f.shape[0]] = f
    return out


def preprocess(images: Sequence[Image.Image], num_crops: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values [n, num_crops+1, 3, 336, 336] float32, image_sizes [n, 2] long (h, w), tokens per image)."""
    num_crops = check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)
    done = [_frames(img, num_crops) for img in images]
    sizes = [hw for _, hw in done]
    return (_stack([f for f, _ in done], num_crops), torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            [num_image_tokens(h, w) for h, w in sizes])


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


def _tag_numbers(prompt: str) -> list[int]:
    """k of every <|image_k|> in prompt, in order."""
    digits = [t[len("<|image_"):-len("|>")] for t in TAG.findall(prompt)]
    for d in digits:
        if len(d) > 9:  # int() of thousands of digits raises (and no image has such a number)
            raise InvalidRequestError(f"an image tag's number has {len(d)} digits: tags are <|image_1|> to "
                                      "<|image_n|> for n images", param="prompt")
    return [int(d) for d in digits]


class Phi3VProcessor:
    """prompt with <|image_N|> tags + images -> MultimodalInputs, as the reference processor."""

    def __init__(self, tokenizer: Tokenizer, *, num_crops: int = DEFAULT_NUM_CROPS, max_length: int = MAX_LENGTH):
        self.tokenizer = tokenizer
        self.num_crops = check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)
        self.max_length = check_int(max_length, "max_length", lo=1)  # ids per prompt: the model's context

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer: Tokenizer) -> Phi3VProcessor:
        """num_crops from the folder's preprocessor_config.json ("num_crops"; 4 when the file or key is absent),
        max_length from config.json's max_position_embeddings when it has one."""
        return cls(tokenizer, num_crops=_config_int(Path(folder) / "preprocessor_config.json", "num_crops",
                                                    DEFAULT_NUM_CROPS, MAX_CROPS),
                   max_length=_config_int(Path(folder) / "config.json", "max_position_embeddings", MAX_LENGTH))

    def __call__(self, prompt: str, images: Sequence[ImageSource] | ImageSource | None = None, *,
                 num_crops: int | None = None) -> MultimodalInputs:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"must be a string, got {type(prompt).__name__}", param="prompt")
        crops = self.num_crops if num_crops is None else check_int(num_crops, "num_crops", lo=1, hi=MAX_CROPS)
        srcs: Sequence[ImageSource]
        if images is None:
            srcs = []
        elif isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)):
            srcs = [images]  # one image
        elif isinstance(images, Sequence):
            srcs = cast("Sequence[ImageSource]", images)  # not bytes: those are one image, above
        else:
            raise InvalidRequestError(f"must be a list of images, got {type(images).__name__}", param="images")
        numbers = _tag_numbers(prompt)
        unique = sorted(set(numbers))
        n = len(srcs)
        if unique != list(range(1, len(unique) + 1)):
            raise InvalidRequestError(
                f"image tags must be numbered <|image_1|> to <|image_n|> without gaps; the prompt has "
                f"{len(unique)} distinct tags numbered {_listed(unique)} and {n} images were given", param="prompt")
        if len(unique) != n:
            span = f" (<|image_1|> to <|image_{len(unique)}|>)" if unique else ""
            raise InvalidRequestError(f"the prompt has {len(unique)} image tags{span} but {n} images were given: "
                                      "each image needs its tag <|image_k|> in the prompt", param="images")
        chunks = [self.tokenizer.encode(c, add_special_tokens=True) for c in TAG.split(prompt)]  # BOS on each
        frames, sizes, tokens = self._images(srcs, numbers, crops, sum(map(len, chunks)))
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids += chunk
            if i < len(numbers):
                k = numbers[i]
                ids += [-k] * tokens[k - 1]
        return MultimodalInputs(torch.tensor(ids, dtype=torch.long), _stack(frames, crops) if n else None,
                                torch.tensor(sizes, dtype=torch.long) if n else None, tokens, crops if n else None)

    def _images(self, images: Sequence[ImageSource], numbers: list[int], crops: int,
                length: int) -> tuple[list[torch.Tensor], list[list[int]], list[int]]:
        """Each image loaded and preprocessed in turn (one full-size image in memory at a time), stopping with
        ContextLengthError once the prompt (length text ids, then the images' placeholders) is over max_length."""
        frames, sizes, tokens = [], [], []
        for i, src in enumerate(images):
            f, (h, w) = _frames(load_image(src, index=i), crops)
            frames.append(f)
            sizes.append([h, w])
            tokens.append(num_image_tokens(h, w))
            length += tokens[-1] * numbers.count(i + 1)
            if length > self.max_length:
                raise ContextLengthError(length, self.max_length, "model's context length",
                                         at_least=i + 1 < len(images))
        return frames, sizes, tokens


def _config_int(path: Path, key: str, default: int, hi: int | None = None) -> int:
    """cfg[key] of the JSON file at path: default when the file or the key is absent; else a checked int."""
    cfg: Any = read_json(path, required=False)
    if cfg is None:
        return default
    if not isinstance(cfg, dict):
        raise ModelFileError(path, f"must be a JSON object, got {type(cfg).__name__}")
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
        want = f"an integer in [1, {hi}]" if hi else "a positive integer"
        raise ConfigError(key, f"must be {want}, got {shown(v)}", path=path)
    return v


def _listed(numbers: list[int]) -> str:
    text = ", ".join(shown(k) for k in numbers[:8])
    return text + (", ..." if len(numbers) > 8 else "") if numbers else "(none)"
