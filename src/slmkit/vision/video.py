"""Evenly spaced frames of a video file, decoded with PyAV (FFmpeg), as RGB PIL images.

Frame i of n is the one at the middle of the i-th of n equal parts of the video: index
``int((i + 0.5) * total / n)`` of its ``total`` frames (counted by demuxing, without decoding). A video
with fewer frames than asked gives all of them. Limits: the file's size (``max_bytes``), the frame size
(``max_pixels``, from the stream header before decoding) and ``frames`` in [1, MAX_FRAMES]. Errors name
the file: ImageError(param="video") for a missing file, a file that is not a video, a still image, a
file without a video stream or without frames; InvalidRequestError(param="frames") for a bad count.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from slmkit.checks import check_int
from slmkit.errors import ImageError, InvalidRequestError

from .images import MAX_IMAGE_PIXELS

MAX_FRAMES = 64  # per video
MAX_VIDEO_BYTES = 2 * 2**30  # per file; frames are decoded as a stream, not read into memory
_STILL_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe")


def _error(path: Path, message: str) -> ImageError:
    return ImageError(message, param="video", file=str(path))


def video_frames(path: str | os.PathLike, frames: int = 8, *, max_bytes: int = MAX_VIDEO_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """Up to `frames` evenly spaced frames of the video at path, in order, as RGB images."""
    n = check_int(frames, "frames", lo=1, hi=MAX_FRAMES)
    check_int(max_bytes, "max_bytes", lo=1)
    check_int(max_pixels, "max_pixels", lo=1)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequestError(f"must be a file path, got {type(path).__name__}", param="video")
    p = Path(os.fsdecode(path))
    _check_file(p, max_bytes)
    try:
        import av
    except ImportError:
        raise _error(p, "video input needs PyAV: pip install 'slmkit[video]'") from None
    try:
        total = _count_frames(av, p, max_pixels)
        m = min(n, total)
        wanted = [int((i + 0.5) * total / m) for i in range(m)]  # increasing: total / m >= 1
        out = _decode(av, p, wanted)
    except ImageError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        why = getattr(e, "strerror", None) or e  # FFmpeg's errors repeat the file name: their reason alone
        raise _error(p, f"is not a readable video ({type(e).__name__}: {why})") from None
    if not out:
        raise _error(p, f"none of its {total} frames could be decoded")
    return out


def _check_file(p: Path, max_bytes: int) -> None:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _error(p, "no such file") from None
    except OSError as e:
        raise _error(p, f"cannot be read ({e.strerror or e})") from None
    if not p.is_file():
        raise _error(p, "is not a regular file")
    if st.st_size == 0:
        raise _error(p, "is empty (0 bytes)")
    if st.st_size > max_bytes:
        raise _error(p, f"is {st.st_size} bytes, over the limit of {max_bytes} bytes per video")


def _video_stream(container: Any, p: Path, max_pixels: int) -> Any:
    if container.format.name in _STILL_FORMATS:
        raise _error(p, f"is a still image ({container.format.name}), not a video: pass it as an image")
    if not container.streams.video:
        raise _error(p, f"has no video stream (format {container.format.name})")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > max_pixels:
        raise _error(p, f"has {w}x{h} = {w * h} pixel frames, over the limit of {max_pixels} pixels per frame")
    return stream


def _count_frames(av: Any, p: Path, max_pixels: int) -> int:
    """Frames of the first video stream, counted from its packets (the header's count may be absent or wrong)."""
    with av.open(str(p), mode="r") as container:
        stream = _video_stream(container, p, max_pixels)
        total = sum(1 for packet in container.demux(stream) if packet.size)
    if total == 0:
        raise _error(p, "has a video stream without frames")
    return total


def _decode(av: Any, p: Path, wanted: list[int]) -> list[Image.Image]:
    """The frames at the (sorted) indices wanted, decoding in order and stopping after the last."""
    out: list[Image.Image] = []
    targets = iter(wanted)
    nxt = next(targets)
    with av.open(str(p), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i == nxt:
                out.append(frame.to_image().convert("RGB"))
                nxt = next(targets, -1)
                if nxt < 0:
                    break
    return out
