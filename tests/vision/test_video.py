"""video_frames: evenly spaced frames of videos written here with PyAV (each frame one grey level, so a
frame's index can be read back from its colour), and errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slmkit.errors import ImageError, InvalidRequestError
from slmkit.vision import MAX_FRAMES, video_frames

av = pytest.importorskip("av")

N = 30
STEP = 8  # grey level of frame i: 4 + 8 i, far enough apart to survive lossy coding


def write_video(path: Path, codec: str, frames: int = N, size=(64, 48)) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "bf": "2"}  # B-frames: decode order differs from presentation order
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), 4 + STEP * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def index_of(img: Image.Image) -> int:
    return int(round((np.asarray(img).astype(float).mean() - 4) / STEP))


@pytest.fixture(scope="module", params=[("mp4", "libx264"), ("webm", "libvpx"), ("mp4", "mpeg4")],
                ids=["h264-mp4", "vp8-webm", "mpeg4-mp4"])
def video(request, tmp_path_factory) -> Path:
    ext, codec = request.param
    return write_video(tmp_path_factory.mktemp("video") / f"clip.{ext}", codec)


@pytest.mark.parametrize("frames", [1, 5, 8, 30])
def test_evenly_spaced_frames(video, frames):
    got = video_frames(video, frames)
    assert len(got) == frames
    assert all(im.mode == "RGB" and im.size == (64, 48) for im in got)
    want = [int((i + 0.5) * N / frames) for i in range(frames)]  # the middle of each of `frames` equal parts
    assert [index_of(im) for im in got] == want


def test_default_and_more_frames_than_the_video_has(video):
    assert [index_of(im) for im in video_frames(video)] == [int((i + 0.5) * N / 8) for i in range(8)]
    assert [index_of(im) for im in video_frames(str(video), 40)] == list(range(N))  # every frame, once


@pytest.mark.parametrize("bad", [0, -1, MAX_FRAMES + 1, True, 2.5, "8", None])
def test_frames_is_checked(video, bad):
    with pytest.raises(InvalidRequestError) as e:
        video_frames(video, bad)
    assert e.value.param == "frames"


def check_error(e: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    assert isinstance(e.value, ImageError) and e.value.param == "video" and e.value.file == str(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(ImageError) as e:
        video_frames(text)
    check_error(e, text, "not a readable video")


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(ImageError) as e:
        video_frames(path)
    check_error(e, path, "no video stream")


def test_still_image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    with pytest.raises(ImageError) as e:
        video_frames(path)
    check_error(e, path, "still image", "pass it as an image")


def test_missing_empty_and_big_files(tmp_path, video):
    with pytest.raises(ImageError) as e:
        video_frames(tmp_path / "nope.mp4")
    check_error(e, tmp_path / "nope.mp4", "no such file")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        video_frames(empty)
    check_error(e, empty, "0 bytes")
    with pytest.raises(ImageError) as e:
        video_frames(tmp_path)
    check_error(e, tmp_path, "not a regular file")
    with pytest.raises(ImageError) as e:
        video_frames(video, max_bytes=100)
    check_error(e, video, "limit of 100 bytes")
    with pytest.raises(ImageError) as e:
        video_frames(video, max_pixels=64 * 48 - 1)
    check_error(e, video, "64x48", f"limit of {64 * 48 - 1} pixels")
    with pytest.raises(InvalidRequestError) as e2:
        video_frames(b"bytes are not a path")  # type: ignore[arg-type]
    assert e2.value.param == "video"


def test_truncated_video(tmp_path, video):
    cut = tmp_path / f"cut{video.suffix}"
    cut.write_bytes(video.read_bytes()[:200])
    try:
        frames = video_frames(cut, 4)
    except ImageError as e:
        assert e.param == "video" and str(cut) in str(e)
    else:  # a decoder may recover a frame or two from the start; never more than asked, never a crash
        assert 1 <= len(frames) <= 4
