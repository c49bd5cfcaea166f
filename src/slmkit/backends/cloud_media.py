"""Messages as each cloud takes them: image parts read and checked here (file paths and data: URLs
become data: URLs of their own type), NVIDIA NIM's inline ``<img src="data:...">`` tags in a string
content (spec A3), its NVCF asset upload for images over 180,000 base64 characters, Azure's one
image per message for Phi-3.5-vision (spec A2), and the token estimate GitHub's free-tier input
limit is checked with (spec A1)."""
from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidRequestError, ProviderError, UnsupportedByBackendError
from .cloud_keys import scrub

NIM_INLINE_LIMIT = 180_000  # base64 characters of an inline image; above it, NVCF assets (spec A3)
CHARS_PER_TOKEN = 4  # the input estimate: OpenAI's rule of thumb for English, ~4 characters a token
TOKENS_PER_MESSAGE = 4  # role and separators of a chat turn
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}


def image_bytes(url: str, index: int) -> tuple[bytes, str]:
    """(bytes, MIME type) of an image part's url (a file path or data: URL), checked to decode."""
    from PIL import Image

    from ..vision.images import FORMATS, _read, load_image

    data, _ = _read(url, index, 20 * 2**20)
    load_image(data, index=index)  # decodes within the limits, or an ImageError naming images[index]
    with Image.open(io.BytesIO(data), formats=FORMATS) as im:
        return data, _MIME.get(str(im.format), "image/png")


def _is_remote(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("http", "https")


def wire_messages(msgs: Sequence[dict], provider: str, *, inline_images: bool, one_image: bool,
                  upload: Callable[[bytes, str], str] | None = None) -> tuple[list[dict], list[str]]:
    """(OpenAI-format messages for the wire, NVCF asset ids they reference)."""
    out: list[dict] = []
    assets: list[str] = []
    index = 0
    for i, m in enumerate(msgs):
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            images = [p for p in content if p.get("type") == "image_url"]
            if images and one_image and len(images) > 1:
                raise UnsupportedByBackendError("images", provider, f"messages[{i}] has {len(images)} images; "
                                                "Phi-3.5-vision there takes one image per message")
            if images and inline_images and m.get("role") != "user":
                raise InvalidRequestError("images may only be in user messages here", param=f"messages[{i}]")
            parts = []
            for p in content:
                if p.get("type") != "image_url":
                    parts.append({"type": "text", "text": p["text"]})
                    continue
                img = p["image_url"]
                url, detail = (str(img["url"]), img.get("detail")) if isinstance(img, dict) else (str(img), None)
                if inline_images:
                    parts.append({"type": "text", "text": _img_tag(url, index, upload, assets)})
                else:
                    url = url if _is_remote(url) else _data_url(url, index)
                    parts.append({"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail
                                                                                    else {})}})
                index += 1
            m["content"] = " ".join(p["text"] for p in parts) if inline_images else parts
        if m.get("tool_calls"):
            m["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out, assets


def _data_url(url: str, index: int) -> str:
    data, mime = image_bytes(url, index)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _img_tag(url: str, index: int, upload: Callable[[bytes, str], str] | None, assets: list[str]) -> str:
    if _is_remote(url):
        raise InvalidRequestError("NIM takes images inline: pass a file path or a data: URL, not an http(s) URL",
                                  param=f"images[{index}]")
    data, mime = image_bytes(url, index)
    b64 = base64.b64encode(data).decode()
    if len(b64) <= NIM_INLINE_LIMIT or upload is None:
        return f'<img src="data:{mime};base64,{b64}" />'
    asset = upload(data, mime)
    assets.append(asset)
    return f'<img src="data:{mime};asset_id,{asset}" />'


def _tool_call(c: Any) -> Any:
    """An assistant message's tool call with its arguments as the JSON string the wire wants."""
    if hasattr(c, "arguments_json"):  # a slmkit.tools.ToolCall given back as it came
        return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
    if isinstance(c, dict) and isinstance(c.get("function"), dict) and not isinstance(
            c["function"].get("arguments", ""), str):
        fn = dict(c["function"], arguments=json.dumps(c["function"]["arguments"], ensure_ascii=False))
        return {**c, "type": c.get("type", "function"), "function": fn}
    return c


def estimate_tokens(messages: Sequence[dict]) -> int:
    """Input tokens, estimated: 4 per message plus one per 4 characters of its text (images are not
    counted: the provider counts them its own way)."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        else:
            text = content or ""
        if m.get("tool_calls"):
            text += json.dumps(m["tool_calls"], ensure_ascii=False, default=str)
        total += TOKENS_PER_MESSAGE + math.ceil(len(text) / CHARS_PER_TOKEN)
    return total


class NvcfAssets:
    """NVCF asset upload (spec A3): POST {assets_url} -> {uploadUrl, assetId}; PUT the bytes to the
    upload URL (no key: it is a pre-signed URL); DELETE {assets_url}/{assetId} after the answer."""

    def __init__(self, assets_url: str, key: str | None, timeout: float, provider: str = "nim"):
        self.url, self._key, self.timeout, self.provider = assets_url.rstrip("/"), key, timeout, provider

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def upload(self, data: bytes, mime: str) -> str:
        import httpx

        desc = "slmkit image"
        with httpx.Client(timeout=self.timeout) as c:
            r = self._call(c, "POST", self.url, json={"contentType": mime, "description": desc},
                           headers={**self._auth(), "Accept": "application/json"})
            try:
                info = r.json()
                upload_url, asset = str(info["uploadUrl"]), str(info["assetId"])
            except (ValueError, KeyError, TypeError):
                raise ProviderError(self.provider, "the asset service's answer has no uploadUrl / assetId",
                                    status=r.status_code) from None
            self._call(c, "PUT", upload_url, content=data,
                       headers={"Content-Type": mime, "x-amz-meta-nvcf-asset-description": desc})
        return asset

    def delete(self, assets: Sequence[str]) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout) as c:
            for a in assets:
                try:
                    c.delete(f"{self.url}/{a}", headers=self._auth())
                except httpx.HTTPError:  # the asset expires on its own; the answer is what matters
                    pass

    def _call(self, c: Any, method: str, url: str, **kw: Any) -> Any:
        import httpx

        from ..errors import ProviderAuthError, ProviderUnreachableError

        secrets = (self._key or "",)
        try:
            r = c.request(method, url, **kw)
        except httpx.TimeoutException:
            from ..errors import ProviderTimeoutError

            raise ProviderTimeoutError(self.provider, "the asset upload timed out") from None
        except httpx.HTTPError as e:
            raise ProviderUnreachableError(self.provider, scrub(f"cannot reach the asset service "
                                                                f"({type(e).__name__}: {e})", secrets)) from None
        if r.status_code >= 400:
            msg = scrub(f"asset {method}: {r.text[:500]}", secrets)
            kind = ProviderAuthError if r.status_code in (401, 403) else ProviderError
            raise kind(self.provider, msg, status=r.status_code)
        return r
