"""Image loading: every source kind, every mode, and every bad input as a typed ImageError that names the
image (index and file) and the limit; limits enforced before decoding."""
from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from slmkit.errors import ImageError, InvalidRequestError
from slmkit.vision import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, load_image, load_images


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG signature and IHDR for width x height 8-bit RGB, then idat as an IDAT chunk (no IEND)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"")


def colours(width=6, height=4, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def assert_names(e: pytest.ExceptionInfo, index: int, file: Path | None = None, *words: str) -> None:
    assert isinstance(e.value, ImageError)
    assert e.value.param == f"images[{index}]"
    msg = str(e.value)
    assert f"images[{index}]" in msg
    if file is not None:
        assert e.value.file == str(file) and str(file) in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image data is decoded (ImageFile.load)."""
    def refuse(self):
        raise AssertionError("decoded an image that should have been refused from its header")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# -- sources -----------------------------------------------------------------------------------------------------
def test_every_source_kind_gives_the_same_rgb_image(tmp_path):
    img = colours()
    data = encoded(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    want = np.asarray(img)
    for src in (str(path), path, data, bytearray(data), memoryview(data), url, img, Image.open(path)):
        got = load_image(src)
        assert got.mode == "RGB" and got.size == (6, 4)
        assert np.array_equal(np.asarray(got), want), type(src)


def test_load_images_indexes_errors(tmp_path):
    good = encoded(colours())
    with pytest.raises(ImageError) as e:
        load_images([good, good, b"not an image"])
    assert_names(e, 2, None, "supported format")
    assert [im.size for im in load_images([good, colours(3, 9)])] == [(6, 4), (3, 9)]
    for bad in ("a.png", good, colours(), 3):
        with pytest.raises(InvalidRequestError) as e2:
            load_images(bad)
        assert e2.value.param == "images"


def test_refused_sources(tmp_path):
    for src, word in (("http://example.com/a.png", "http(s)"), ("HTTPS://example.com/a.png", "http(s)"),
                      ("data:image/png;base64,@@@@", "base64"), ("data:image/png,rawbytes", "base64"),
                      ("data:image/png;base64", "data:image/png;base64,<data>"), (12, "int"), (None, "NoneType")):
        with pytest.raises(ImageError) as e:
            load_image(src, index=3)
        assert_names(e, 3, None, word)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "missing.png")
    assert_names(e, 0, tmp_path / "missing.png", "no such file")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    assert_names(e, 0, tmp_path, "not a regular file")


# -- limits and broken files -------------------------------------------------------------------------------------
def test_documented_limits():
    assert MAX_IMAGE_BYTES == 20 * 2**20 and MAX_IMAGE_PIXELS == 50_000_000


def test_zero_byte_file_and_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(path, index=1)
    assert_names(e, 1, path, "0 bytes")
    for src in (b"", "data:image/png;base64,"):
        with pytest.raises(ImageError) as e:
            load_image(src)
        assert_names(e, 0, None, "0 bytes")


def test_byte_limit_before_reading(tmp_path, monkeypatch):
    data = encoded(colours(64, 64))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    limit = len(data) - 1
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    for src, file in ((path, path), (data, None), ("data:image/png;base64," + base64.b64encode(data).decode(), None)):
        with pytest.raises(ImageError) as e:
            load_image(src, max_bytes=limit)
        assert_names(e, 0, file, f"limit of {limit} bytes")
    assert opened == []


def test_truncated_file(tmp_path):
    data = encoded(colours(200, 200))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_names(e, 0, path, "truncated or corrupt")
    jpeg = encoded(colours(200, 200), "JPEG")
    with pytest.raises(ImageError) as e:
        load_image(jpeg[:300], index=2)
    assert_names(e, 2)


@pytest.mark.parametrize("data", [b"hello, not an image", b"%PDF-1.4\n", b"\x00" * 64], ids=["text", "pdf", "zeros"])
def test_unknown_formats(data):
    with pytest.raises(ImageError) as e:
        load_image(data)
    assert_names(e, 0, None, "supported format", "PNG")


def test_formats_outside_the_list_are_refused(tmp_path):
    path = tmp_path / "a.tiff"
    colours().save(path, "TIFF")  # Pillow reads TIFF, but only the server's formats are opened
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_names(e, 0, path, "supported format")


def test_zero_by_zero(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_header(0, 0, zlib.compress(b"")))
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_names(e, 0, path, "PNG signature", "0x0")
    with pytest.raises(ImageError) as e:
        load_image(Image.new("RGB", (0, 0)), index=4)
    assert_names(e, 4, None, "0x0", "1x1")


def test_pixel_limit_from_the_header(tmp_path, no_decoding):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(8000, 8000, zlib.compress(b"\x00" * 100)))  # 64 M pixels: over 50 M
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_names(e, 0, path, "8000x8000", f"limit of {MAX_IMAGE_PIXELS} pixels")
    with pytest.raises(ImageError) as e:
        load_image(encoded(colours(20, 10)), max_pixels=199, index=1)
    assert_names(e, 1, None, "20x10", "limit of 199 pixels")


def test_decompression_bomb_is_never_decoded(tmp_path, no_decoding):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000, zlib.compress(b"\x00" * 100_000)))
    with pytest.raises(ImageError) as e:
        load_image(path, index=5)
    assert_names(e, 5, path, f"limit of {MAX_IMAGE_PIXELS} pixels")


# -- modes -------------------------------------------------------------------------------------------------------
def test_cmyk_jpeg_as_the_reference_converts():
    cmyk = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK")
    data = encoded(cmyk, "JPEG", quality=95)
    got = load_image(data)
    want = Image.open(io.BytesIO(data)).convert("RGB")  # what the reference does
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))


def test_palette_with_transparency_without_warnings():
    pal = Image.new("P", (4, 2))
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    pal.putdata([0, 1, 2, 3, 250, 251, 252, 255])
    for kw in ({"transparency": 0}, {"transparency": bytes([0, 128] + [255] * 254)}):
        data = encoded(pal, "PNG", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = load_image(data)
        assert got.mode == "RGB"
        assert np.asarray(got)[1, 3].tolist() == [255, 0, (7 * 255) % 256]  # the palette colour, alpha dropped
        assert np.asarray(got)[0, 0].tolist() == [0, 255, 0]


def test_alpha_is_dropped_as_the_reference():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [1, 2, 3]]]
    rgba[..., 3] = [[0, 255], [128, 7]]
    got = load_image(encoded(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(np.asarray(got), rgba[..., :3])
    la = Image.fromarray(np.stack([np.full((2, 3), 77, np.uint8), np.zeros((2, 3), np.uint8)], -1), "LA")
    assert (np.asarray(load_image(encoded(la))) == 77).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 257 * 100, 65535], [128, 30000, 65534]], dtype=np.uint16)
    data = encoded(Image.fromarray(grey))
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # really a 16-bit file
    got = np.asarray(load_image(data))
    want = np.round(grey / 257).astype(np.uint8)
    assert got.shape == (2, 3, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "YCbCr"])
def test_other_modes(mode):
    img = colours(5, 3).convert(mode)
    fmt = "JPEG" if mode == "YCbCr" else "PNG"
    got = load_image(img if fmt == "JPEG" else encoded(img))
    assert got.mode == "RGB" and got.size == (5, 3)
    assert np.array_equal(np.asarray(got), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_the_first_frame_with_a_warning(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with pytest.warns(UserWarning, match=r"images\[2\].*anim.*3 frames"):
        got = load_image(path, index=2)
    assert got.mode == "RGB" and np.asarray(got)[4, 4].tolist() == [255, 0, 0]
