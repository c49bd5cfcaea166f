"""Images and video for vision models: loading with limits checked before decoding (images), the
Phi-3-vision image processor and prompt ids (phi3v), evenly spaced video frames (video; needs PyAV)."""
from __future__ import annotations

from .images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageSource, load_image, load_images
from .phi3v import (
    CLIP_MEAN,
    CLIP_STD,
    MultimodalInputs,
    Phi3VProcessor,
    hd_transform,
    num_image_tokens,
    preprocess,
)
from .video import MAX_FRAMES, video_frames

__all__ = ["CLIP_MEAN", "CLIP_STD", "MAX_FRAMES", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "ImageSource",
           "MultimodalInputs", "Phi3VProcessor", "hd_transform", "load_image", "load_images", "num_image_tokens",
           "preprocess", "video_frames"]
