"""`slm run`'s images and video: --image PATH (repeatable), --video PATH --frames N, --num-crops N,
and the chat's /image PATH. Images become OpenAI image parts (file paths; video frames as PNG
data: URLs) placed before the text of the message they go with."""
from __future__ import annotations

import argparse
import base64
import io
import shlex
from typing import Any

from .api import check_images
from .errors import InvalidRequestError

VIDEO_NUM_CROPS = 4  # the model card's advice for many frames (one image: the folder's num_crops)


def add_vision_args(run: argparse.ArgumentParser, positive: Any) -> None:
    run.add_argument("--image", action="append", default=None, metavar="PATH",
                     help="an image for a vision model (repeatable; placed before the prompt's text)")
    run.add_argument("--video", default=None, metavar="PATH", help="a video: --frames evenly spaced frames, "
                     "each an image (vision models)")
    run.add_argument("--frames", type=positive, default=None,
                     help="frames taken from --video (default 8)")
    run.add_argument("--num-crops", type=positive, default=None, help="image crops per image, 1-64 (default: "
                     f"the model's preprocessor_config.json; {VIDEO_NUM_CROPS} for --video)")


def media_parts(a: argparse.Namespace) -> list[dict]:
    """Image parts for --image and --video, each file read and checked now (before the model
    loads): a missing, damaged or oversized file is an error naming it."""
    if a.frames is not None and a.video is None:
        raise InvalidRequestError("needs --video", param="--frames")
    parts = [image_part(path, i) for i, path in enumerate(a.image or [])]
    if a.video is not None:
        from .vision.video import video_frames

        parts += [{"type": "image_url", "image_url": {"url": _png_data_url(frame)}}
                  for frame in video_frames(a.video, a.frames or 8)]
    return parts


def num_crops(a: argparse.Namespace) -> int | None:
    return a.num_crops if a.num_crops is not None else (VIDEO_NUM_CROPS if a.video is not None else None)


def image_part(path: str, index: int = 0) -> dict:
    """An image part for a file, after checking that it decodes as an image within the limits."""
    from .vision.images import load_image

    load_image(path, index=index)
    return {"type": "image_url", "image_url": {"url": path}}


def _png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def check_takes_images(llm: Any, raw: bool, what: str = "--image") -> None:
    """One clear error when images cannot go to this model: a text-only model, or plain completion."""
    check_images(llm.name, llm.capabilities.images, model_type=llm.backend.model_type, param=what)
    if raw:
        raise InvalidRequestError("needs the chat template; drop --raw", param=what)


def user_content(text: str, images: list[dict]) -> str | list[dict]:
    """A user message's content: the text alone, or the image parts then the text."""
    return [*images, {"type": "text", "text": text}] if images else text


def chat_kwargs(crops: int | None) -> dict[str, Any]:
    return {} if crops is None else {"num_crops": crops}


def attach(llm: Any, command: str, pending: list[dict], raw: bool) -> str:
    """The chat's `/image PATH`: check the file and the model, keep the part for the next message.
    Returns what to tell the user."""
    path = command[len("/image"):].strip()
    try:  # a path pasted or dropped into a terminal may come quoted or with escaped spaces
        words = shlex.split(path)
    except ValueError:
        words = []
    path = words[0] if len(words) == 1 else path
    if not path:
        return "usage: /image PATH (attaches the image to your next message)"
    check_takes_images(llm, raw, "/image")
    pending.append(image_part(path, len(pending)))
    return f"(image {len(pending)} attached to your next message: {path})"
