"""Image parts of a request, checked before any model sees them: data: URLs are decoded, http(s)
URLs fetched (remote hosts only when the server allows it: all, or a list of hosts) with a byte
limit and a timeout, and every image must open with Pillow within a pixel limit. Fetched images
become data: URLs, so nothing past this point touches the network. Errors name the part:
InvalidRequestError(param="messages[0].content[1].image_url"). URLs on this machine (localhost,
127.0.0.0/8, ::1) are always fetched; remote hosts only when allowed."""
from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidRequestError

MAX_BYTES = 20 * 2**20  # per image, as OpenAI's limit
MAX_PIXELS = 50_000_000  # decompression bombs
FETCH_TIMEOUT_S = 10.0  # per URL, the whole fetch
MAX_IMAGES = 16  # per request
MAX_TOTAL_BYTES = 64 * 2**20  # per request
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP"]  # what Pillow may decode (no EPS / Ghostscript)
PartNames = Callable[[int, int], str]  # (message index, part index) -> the field an error names


@dataclass
class FetchPolicy:
    allow: bool | Sequence[str] = False  # True: any http(s) host; a list: those hosts only
    max_bytes: int = MAX_BYTES
    timeout_s: float = FETCH_TIMEOUT_S
    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    max_total_bytes: int = MAX_TOTAL_BYTES
    hosts: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.hosts = set() if isinstance(self.allow, bool) else {h.lower() for h in self.allow}

    def allows(self, host: str) -> bool:
        """Loopback hosts always (this machine); remote ones only when the server allows them."""
        return self.allow is True or host.lower() in self.hosts or _loopback(host)


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def check_image(data: bytes, param: str, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, or a named error."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise _bad("image input needs Pillow on the server (pip install 'slmkit[serve]')", param) from None
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _bad(f"the image is {w}x{h} pixels, over the limit of {max_pixels}", param)
            im.load()  # decodes: a truncated or corrupt file fails here
            return str(im.format or "").lower(), w, h
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _bad(f"is not a readable image ({type(e).__name__}: {e})", param) from None


def decode_data_url(url: str, param: str, max_bytes: int = MAX_BYTES) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise _bad("a data: URL needs the form data:image/png;base64,<data>", param)
    if not head.endswith(";base64"):
        raise _bad("only base64 data: URLs are supported", param)
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad(f"the image is over the limit of {max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"the data: URL is not valid base64 ({e})", param) from None


async def fetch(url: str, param: str, policy: FetchPolicy) -> tuple[bytes, str]:
    """The bytes and content type at an http(s) URL, within the policy's limits (the timeout
    bounds the whole fetch, not each read)."""
    import asyncio

    try:
        return await asyncio.wait_for(_fetch(url, param, policy), policy.timeout_s)
    except asyncio.TimeoutError:
        raise _bad(f"fetching the image timed out after {policy.timeout_s:g} s", param) from None


async def _fetch(url: str, param: str, policy: FetchPolicy) -> tuple[bytes, str]:
    import httpx

    try:
        host = urlsplit(url).hostname or ""
    except ValueError as e:
        raise _bad(f"is not a valid URL ({e})", param) from None
    if not policy.allows(host):
        if policy.allow is False:
            why = ("fetching image URLs from remote hosts is off on this server (start it with --image-urls, or "
                   "send the image as a data: URL)")
        else:
            why = f"host {host!r} is not in the server's --image-urls list"
        raise _bad(why, param)
    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise _bad(f"fetching the image failed: HTTP {r.status_code} from {host}", param)
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _bad(f"the image is {declared} bytes, over the limit of {policy.max_bytes}", param)
                data = bytearray()
                async for piece in r.aiter_bytes():
                    data += piece
                    if len(data) > policy.max_bytes:
                        raise _bad(f"the image is over the limit of {policy.max_bytes} bytes", param)
                return bytes(data), r.headers.get("content-type", "")
    except InvalidRequestError:
        raise
    except httpx.TimeoutException:
        raise _bad(f"fetching the image timed out after {policy.timeout_s:g} s", param) from None
    except Exception as e:  # noqa: BLE001 -- bad URLs (httpx.InvalidURL), refused connections, TLS, ...
        raise _bad(f"fetching the image failed ({type(e).__name__}: {e})", param) from None


def has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"]) for m in messages)


def _openai_name(i: int, j: int) -> str:
    return f"messages[{i}].content[{j}].image_url"


async def resolve(messages: Any, policy: FetchPolicy, names: PartNames | None = None) -> Any:
    """messages with every image part checked (and fetched ones as data: URLs); anything that is not
    a list of messages is returned as it is, for the chat template's own checks to name. names(i, j)
    names part j of message i in errors (default: its OpenAI path; Ollama's routes name `images`)."""
    import asyncio

    if not isinstance(messages, list):
        return messages
    out, count, total = [], 0, 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "image_url"):
                parts.append(part)
                continue
            param = (names or _openai_name)(i, j)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _bad("an image_url part needs a non-empty string 'image_url.url'", param)
            count += 1
            if count > policy.max_images:
                raise _bad(f"a request may have at most {policy.max_images} images", param)
            scheme = url.split(":", 1)[0].lower() if ":" in url else ""
            if scheme == "data":
                data = await asyncio.to_thread(decode_data_url, url, param, policy.max_bytes)
            elif scheme in ("http", "https"):
                data, _ = await fetch(url, param, policy)
            else:
                raise _bad(f"image URLs must be data: or http(s): URLs, got {scheme or 'no'} scheme", param)
            total += len(data)
            if total > policy.max_total_bytes:
                raise _bad(f"the request's images are over {policy.max_total_bytes} bytes in all", param)
            fmt, _, _ = await asyncio.to_thread(check_image, data, param, policy.max_pixels)
            if scheme != "data":
                url = f"data:image/{fmt or 'png'};base64,{base64.b64encode(data).decode()}"
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}})
        out.append({**m, "content": parts})
    return out
