"""The Phi-3-vision image preprocessing against an independent computation written here from
shared/specs/phi-family.md §4 (PIL + numpy + torch; nothing of slmkit.vision's helpers is used)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slmkit.errors import InvalidRequestError
from slmkit.vision import CLIP_MEAN, CLIP_STD, hd_transform, num_image_tokens, preprocess

SIZES = [(1, 1), (1, 2000), (2000, 1), (337, 335), (335, 337), (336, 336), (2048, 1152), (1152, 2048),
         (500, 300), (100, 1000), (672, 673), (3, 7)]  # (width, height)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels, so that every resize and crop boundary shows in the values."""
    rng = np.random.default_rng(seed + 7 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def reference(img: Image.Image, hd_num: int) -> tuple[torch.Tensor, list[int], int]:
    """(frames [hd_num+1, 3, 336, 336], [h, w], tokens) written from §4, step by step."""
    img = img.convert("RGB")
    w, h = img.size
    trans = w < h
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        w, h = img.size
    ratio = w / h
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = max(int(new_w / ratio), 1)  # slmkit's documented guard: the reference fails on a 0-pixel height
    resized = np.asarray(img.resize((new_w, new_h), Image.BILINEAR))
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    arr = np.full((tar, new_w, 3), 255, dtype=np.uint8)
    arr[top:top + new_h] = resized
    if trans:
        arr = arr.transpose(1, 0, 2)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255
    x = (x - MEAN[:, None, None]) / STD[:, None, None]
    H, W = arr.shape[:2]
    glob = F.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    crops = [x[:, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] for r in range(H // 336) for c in range(W // 336)]
    frames = torch.zeros(hd_num + 1, 3, 336, 336)
    frames[0] = glob
    for i, c in enumerate(crops):
        frames[1 + i] = c
    hc, wc = H // 336, W // 336
    return frames, [H, W], (hc * wc + 1) * 144 + 1 + (hc + 1) * 12


def test_constants_are_clips():
    assert torch.allclose(torch.tensor(CLIP_MEAN), MEAN)
    assert torch.allclose(torch.tensor(CLIP_STD), STD)


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_matches_the_reference(size, num_crops):
    img = noise(*size)
    pv, sizes, tokens = preprocess([img], num_crops)
    want, want_size, want_tokens = reference(img, num_crops)
    assert pv.dtype == torch.float32 and pv.shape == (1, num_crops + 1, 3, 336, 336)
    assert sizes.dtype == torch.long and sizes.tolist() == [want_size]
    assert tokens == [want_tokens]
    h_c, w_c = want_size[0] // 336, want_size[1] // 336
    assert h_c * w_c <= num_crops
    torch.testing.assert_close(pv[0], want, rtol=0, atol=1e-6)
    assert not pv[0, 1 + h_c * w_c:].any()  # the padding frames are zero


@pytest.mark.parametrize("size,num_crops,hw", [
    ((2048, 1152), 4, [672, 672]),  # §4's worked example (a 16:9 slide)
    ((1, 1), 1, [336, 336]),
    ((2000, 1), 16, [336, 5376]),  # 16 crops in a row; the height 2 px padded to 336
    ((1, 2000), 16, [5376, 336]),
    ((2000, 1), 1, [336, 336]),  # resized height int(336/2000) = 0 -> 1 px
    ((1152, 2048), 16, [1680, 1008]),  # portrait: scale 5 (5 * ceil(5 / 1.78) = 15), 3 wide x 5 high
    ((336, 336), 16, [1344, 1344]),  # scale 4: 4 * ceil(4/1) = 16
])
def test_hd_sizes_by_hand(size, num_crops, hw):
    assert preprocess([noise(*size)], num_crops)[1].tolist() == [hw]
    assert hd_transform(noise(*size), num_crops).size == (hw[1], hw[0])


def test_token_counts_of_the_worked_examples():
    assert num_image_tokens(672, 672) == 757
    assert num_image_tokens(1344, 1344) == 2509
    assert num_image_tokens(336, 336) == 2 * 144 + 1 + 2 * 12
    assert num_image_tokens(336, 672) != num_image_tokens(672, 336)  # rows get a separator each: not symmetric
    for bad in (0, 335, 337, -336):
        with pytest.raises(InvalidRequestError) as e:
            num_image_tokens(bad, 336)
        assert e.value.param == "height"


def test_padding_is_white_and_centred():
    img = Image.new("RGB", (2048, 1152), (0, 0, 0))  # -> 672 x 378 resized, 294 rows of white, top 147
    hd = np.asarray(hd_transform(img, 4))
    assert hd.shape == (672, 672, 3)
    assert (hd[:147] == 255).all() and (hd[147 + 378:] == 255).all() and (hd[147:147 + 378] == 0).all()
    pv, _, _ = preprocess([img], 4)
    white = (1 - MEAN) / STD
    torch.testing.assert_close(pv[0, 1, :, 0, 0], white)  # the first crop's top-left corner is padding


def test_several_images_are_independent():
    a, b = noise(500, 300), noise(40, 900, seed=1)
    pv, sizes, tokens = preprocess([a, b], 4)
    pa, sa, ta = preprocess([a], 4)
    pb, sb, tb = preprocess([b], 4)
    assert pv.shape == (2, 5, 3, 336, 336)
    assert torch.equal(pv[0], pa[0]) and torch.equal(pv[1], pb[0])
    assert sizes.tolist() == sa.tolist() + sb.tolist() and tokens == ta + tb
    empty = preprocess([], 4)
    assert empty[0].shape == (0, 5, 3, 336, 336) and empty[1].shape == (0, 2) and empty[2] == []


def test_non_rgb_input_is_converted():
    grey = Image.fromarray(np.arange(90 * 60, dtype=np.uint8).reshape(60, 90) % 251, "L")
    torch.testing.assert_close(preprocess([grey], 4)[0], preprocess([grey.convert("RGB")], 4)[0], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 65, -1, True, 4.0, "4", None])
def test_num_crops_is_checked(bad):
    with pytest.raises(InvalidRequestError) as e:
        preprocess([noise(10, 10)], bad)
    assert e.value.param == "num_crops"


def test_scale_rule_is_the_largest():
    """scale*ceil(scale/ratio) <= num_crops for the chosen scale and not for scale + 1."""
    for w, h in SIZES:
        for n in (1, 2, 3, 4, 9, 16, 64):
            hd = hd_transform(noise(w, h), n)
            long_side, short_side = max(w, h), min(w, h)
            scale = max(hd.size) // 336  # the landscape form's width, scale * 336
            ratio = long_side / short_side
            assert scale * math.ceil(scale / ratio) <= n < (scale + 1) * math.ceil((scale + 1) / ratio)
