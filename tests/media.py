"""Real media files for the tests, written with PyAV (nothing is downloaded, nothing is mocked).

Frames are numpy uint8 arrays (T, H, W, 3) in RGB; the encoder converts them to the requested pixel format.
``index_frames`` makes frames whose brightness encodes their index, so a decoded frame says which source
frame it is even after lossy compression (``frame_index_of``).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Brightness step between consecutive frames of ``index_frames``: large enough that H.264/MPEG-4 at tiny
# sizes (errors of a few levels) never confuses neighbours, small enough for 40 frames (0..234).
INDEX_STEP = 6

DEFAULT_PIX_FMT = {
    "libx264": "yuv420p",
    "mpeg4": "yuv420p",
    "mjpeg": "yuvj420p",
    "libvpx-vp9": "yuv420p",
    "ffv1": "yuv420p",
}


def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with ``name`` (e.g. VP9 is optional)."""
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def index_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Uniform grey frames, frame i at brightness i * INDEX_STEP (``frame_index_of`` reads it back)."""
    if (num_frames - 1) * INDEX_STEP > 255:
        raise ValueError("too many frames for the brightness code")
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = i * INDEX_STEP
    return frames


def frame_index_of(frame: np.ndarray) -> int:
    """The index encoded by ``index_frames`` in a decoded (H, W, 3) or (3, H, W) frame."""
    return int(round(float(np.asarray(frame, dtype=np.float64).mean()) / INDEX_STEP))


def split_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Left half red, right half blue (``width`` even), for crop/rotation/resize checks."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[:, :, : width // 2, 0] = 255
    frames[:, :, width // 2 :, 2] = 255
    return frames


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 24,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    *,
    rotation: int | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    gop: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB into ``path``; the container follows the suffix.

    ``rotation``: clockwise display rotation written as the stream's display matrix (PyAV's
    ``set_display_rotation`` takes counter-clockwise degrees, hence the sign). ``pts``/``time_base``: explicit
    timestamps for variable-frame-rate files. ``gop``: keyframe interval, so tests can make seeking skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, np.uint8)
    _, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or DEFAULT_PIX_FMT.get(codec, "yuv420p")
        if gop is not None:
            stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(-rotation)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = time_base or Fraction(1, 1) / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write one (H, W, 3) uint8 RGB picture as png/jpg/bmp/webp (by suffix) through FFmpeg's image2."""
    path = Path(path)
    codec, pix_fmt = {
        ".png": ("png", "rgb24"),
        ".jpg": ("mjpeg", "yuvj444p"),
        ".jpeg": ("mjpeg", "yuvj444p"),
        ".bmp": ("bmp", "bgr24"),
        ".webp": ("libwebp", "yuv420p"),
    }[path.suffix.lower()]
    height, width, _ = array.shape
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        frame = av.VideoFrame.from_ndarray(np.asarray(array, np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def write_audio(path: str | Path, codec: str = "aac", seconds: float = 0.5, rate: int = 44100) -> Path:
    """An audio-only file (a sine tone): .m4a with aac, .wav with pcm_s16le, .mka with mp2, ..."""
    path = Path(path)
    samples = int(seconds * rate)
    tone = (np.sin(np.arange(samples) * 2 * np.pi * 440 / rate) * 8000).astype(np.int16)[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples, frame_size):
            chunk = tone[:, start : start + frame_size]
            if chunk.shape[1] < frame_size and codec != "pcm_s16le":
                chunk = np.pad(chunk, ((0, 0), (0, frame_size - chunk.shape[1])))
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def full_decode_count(path: str | Path) -> int:
    """Frames a complete decode of the first video stream yields (the ground truth for probing)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def decode_all(path: str | Path) -> list[np.ndarray]:
    """Every frame as (H, W, 3) RGB, decoded from the start (the reference for seek tests)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
