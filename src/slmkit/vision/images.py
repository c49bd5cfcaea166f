"""Images from files, data: URLs, bytes or PIL images, checked before anything decodes them.

Limits (documented, enforced in this order): the encoded size against ``max_bytes`` before the bytes are
read or opened; the width x height from the header against ``max_pixels`` before ``load()`` decodes a
pixel (Pillow's own decompression-bomb refusal becomes the same error); only the formats the server
accepts (PNG, JPEG, GIF, WebP, BMP) are opened. Every failure is an ImageError with
``param="images[i]"`` whose message names the image (index, and the file when there is one) and the
limit at fault.

Modes become RGB as the reference processor's ``convert_to_rgb`` (transformers) does: CMYK, palette, L
by ``convert("RGB")``; images with transparency (RGBA, LA, PA, a palette or grey image with a
transparent colour) composited over white, so a transparent logo's black text stays readable rather
than turning into black on black; 16-bit grey (``I;16``, ``I``) scaled to 8 bits (65535 -> 255)
rather than clipped. Animated GIF/WebP/PNG: the first frame, with a
warning naming the image and its frame count.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from slmkit.checks import check_int
from slmkit.errors import ImageError, InvalidRequestError

MAX_IMAGE_BYTES = 20 * 2**20  # per image (encoded), checked before decoding; OpenAI's limit
MAX_IMAGE_PIXELS = 50_000_000  # width*height, checked from the header before decoding
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # what Pillow may open (as the server: no EPS / Ghostscript)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


class _Where:
    """The image an error is about: its param (images[i]) and file, if any."""

    def __init__(self, index: int, file: str | None = None):
        self.param, self.file = f"images[{index}]", file

    def error(self, message: str) -> ImageError:
        return ImageError(message, param=self.param, file=self.file)

    def __str__(self) -> str:
        return self.param + (f" ({self.file})" if self.file else "")


def load_image(src: ImageSource, *, index: int = 0, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """src as an RGB PIL image, within the limits, or an ImageError naming it (``images[index]``)."""
    check_int(index, "index", lo=0)
    check_int(max_bytes, "max_bytes", lo=1)
    check_int(max_pixels, "max_pixels", lo=1)
    if isinstance(src, Image.Image):
        where = _Where(index, getattr(src, "filename", None) or None)
        return _finish(src, where, max_pixels)
    data, where = _read(src, index, max_bytes)
    return _decode(data, where, max_pixels)


def read_image_bytes(src: str | os.PathLike | bytes, *, index: int = 0, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of a file path, data: URL or bytes (not decoded), for a backend that sends
    them on (a running Ollama); errors as load_image's."""
    check_int(max_bytes, "max_bytes", lo=1)
    return _read(src, index, max_bytes)[0]


def load_images(srcs: Sequence[ImageSource], **limits: Any) -> list[Image.Image]:
    """load_image of each source (``images[i]`` names the i-th in errors); limits: max_bytes, max_pixels."""
    if isinstance(srcs, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)) \
            or not isinstance(srcs, Sequence):
        raise InvalidRequestError(f"must be a list of images, got {type(srcs).__name__}", param="images")
    return [load_image(s, index=i, **limits) for i, s in enumerate(srcs)]


# -- reading the bytes -------------------------------------------------------------------------------------------
def _read(src: Any, index: int, max_bytes: int) -> tuple[bytes, _Where]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        where = _Where(index)
        size = src.nbytes if isinstance(src, memoryview) else len(src)
        _check_size(size, where, max_bytes)
        return bytes(src), where
    if isinstance(src, str) and src[:5].lower() == "data:":
        where = _Where(index)
        return _data_url(src, where, max_bytes), where
    if isinstance(src, str) and src.split(":", 1)[0].lower() in ("http", "https"):
        raise _Where(index).error("http(s) image URLs are not fetched here: pass a file path, a data: URL or bytes "
                                  "(the server fetches URLs under its own rules)")
    if isinstance(src, (str, os.PathLike)):
        path = Path(os.fsdecode(src))
        where = _Where(index, str(path))
        return _read_file(path, where, max_bytes), where
    raise _Where(index).error(f"must be a file path, a data: URL, bytes or a PIL image, got {type(src).__name__}")


def _check_size(size: int, where: _Where, max_bytes: int) -> None:
    if size == 0:
        raise where.error("is empty (0 bytes)")
    if size > max_bytes:
        raise where.error(f"is {size} bytes, over the limit of {max_bytes} bytes per image")


def _read_file(path: Path, where: _Where, max_bytes: int) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise where.error("no such file") from None
    except OSError as e:
        raise where.error(f"cannot be read ({e.strerror or e})") from None
    if not path.is_file():
        raise where.error("is not a regular file")
    _check_size(st.st_size, where, max_bytes)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as e:
        raise where.error(f"cannot be read ({e.strerror or e})") from None
    _check_size(len(data), where, max_bytes)
    return data


def _data_url(url: str, where: _Where, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise where.error("a data: URL needs the form data:image/png;base64,<data>")
    if not head.lower().endswith(";base64"):
        raise where.error("only base64 data: URLs are supported (data:image/png;base64,<data>)")
    if len(payload) // 4 * 3 > max_bytes + 2:  # the decoded size, known before decoding
        raise where.error(f"is about {len(payload) // 4 * 3} bytes, over the limit of {max_bytes} bytes per image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise where.error(f"the data: URL is not valid base64 ({e})") from None
    _check_size(len(data), where, max_bytes)
    return data


# -- decoding ----------------------------------------------------------------------------------------------------
def _decode(data: bytes, where: _Where, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own refusal, from the header (nothing decoded)
        raise where.error(f"is over the limit of {max_pixels} pixels per image (Pillow: {e})") from None
    except UnidentifiedImageError:
        fmt = _signature(data)
        if fmt:  # Pillow refuses e.g. a 0x0 PNG as "unidentified"
            raise where.error(f"has a {fmt} signature but its header cannot be read (a 0x0 image, or a corrupt "
                              "header)") from None
        raise where.error(f"is not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a broken header
        raise where.error(f"cannot be read as an image ({type(e).__name__}: {e})") from None
    return _finish(im, where, max_pixels)


def _signature(data: bytes) -> str | None:
    """The supported format whose signature data starts with, if any (Pillow's own checks)."""
    Image.init()
    for fmt in FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(data[:16]) is True:
            return fmt
    return None


def _finish(im: Image.Image, where: _Where, max_pixels: int) -> Image.Image:
    """The checks that need only the header, then load() and the RGB conversion."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise where.error(f"is {w}x{h} pixels: an image needs at least 1x1")
    if w * h > max_pixels:
        raise where.error(f"is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels per image")
    try:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            warnings.warn(f"{where}: is animated ({frames} frames): only frame {im.tell() + 1} is used",
                          stacklevel=4)
        im.load()
    except Image.DecompressionBombError as e:
        raise where.error(f"is over the limit of {max_pixels} pixels per image (Pillow: {e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise where.error(f"is truncated or corrupt ({type(e).__name__}: {e})") from None
    return _to_rgb(im, where)


def _to_rgb(im: Image.Image, where: _Where) -> Image.Image:
    if im.mode in _SIXTEEN_BIT:
        # scale 0..65535 to 0..255 (rounded): convert("RGB") would clip everything above 255 to white
        a = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    try:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")  # (a palette's transparency straight to RGB makes Pillow warn)
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise where.error(f"has mode {im.mode}, which cannot be converted to RGB ({e})") from None
