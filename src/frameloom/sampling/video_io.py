"""Writing (and reading back) sampled videos as H.264 mp4 files with PyAV.

Two frame layouts meet here:

* the model's layout, a ``torch.Tensor`` shaped ``(C=3, T, H, W)``, either ``uint8`` in [0, 255] or floating
  point in [-1, 1] (what a pixel-space sampler or a VAE decoder returns);
* the decoder's layout, a ``numpy.ndarray`` shaped ``(T, H, W, 3)`` of ``uint8`` (what PyAV returns and what
  the synthetic data renderer produces).

Both are accepted by :func:`write_mp4`; :func:`read_mp4` returns the decoder's layout.
"""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from frameloom.errors import FrameloomError

# x264's constant rate factor: 0 is lossless, 23 is its default. Our videos are often tiny (16-64 pixels) and
# their colours are what gets scored, so we spend bits: at crf 12 a 32x32 clip is still only a few kB.
DEFAULT_CRF = 12

# Without these, libx264 (single-threaded, same input) gave different bytes, and different decoded frames,
# for a few percent of small clips depending on what had been encoded before in the process: its B-frame
# decision together with the macroblock tree is not repeatable on tiny frames. Turning off B-frames and the
# macroblock tree made 1,900 of 1,900 clips (16x16 to 128x128, clean and noisy) repeat exactly; the cost is
# a slightly larger file, and decoders get frames in presentation order.
_X264_PARAMS = "bframes=0:mbtree=0"


class VideoWriteError(FrameloomError):
    """A video could not be written (bad shape or dtype, or an encoder failure)."""


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Return ``video`` as ``uint8`` in [0, 255], keeping its shape.

    ``uint8`` input is returned unchanged. Floating-point input is taken to be in [-1, 1] and mapped with
    ``(x + 1) * 127.5``, clamped to [0, 255] and rounded to the nearest integer (a sampler's output overshoots
    the range a little; clamping keeps that from wrapping around).
    """
    if video.dtype == torch.uint8:
        return video
    if not video.is_floating_point():
        raise VideoWriteError(f"video tensor must be uint8 or floating point in [-1, 1], got {video.dtype}")
    return ((video.detach().float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)


def _as_thwc_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Either accepted layout -> contiguous ``(T, H, W, 3)`` uint8 numpy array."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise VideoWriteError(f"video tensor must be shaped (3, T, H, W), got {tuple(video.shape)}")
        # (3, T, H, W) -> (T, H, W, 3)
        return np.ascontiguousarray(to_uint8(video).cpu().permute(1, 2, 3, 0).numpy())
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise VideoWriteError(
                f"video array must be uint8 shaped (T, H, W, 3), got {video.dtype} {tuple(video.shape)}"
            )
        return np.ascontiguousarray(video)
    raise VideoWriteError(f"video must be a torch.Tensor or numpy.ndarray, got {type(video).__name__}")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad height/width up to even sizes by repeating the last row/column (yuv420p halves both for chroma)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(
    video: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    fps: float,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
    threads: int | None = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Encode ``video`` as an H.264 (libx264, yuv420p) mp4 at ``path`` and return the path.

    Args:
        video: a ``torch.Tensor`` shaped ``(3, T, H, W)``, ``uint8`` in [0, 255] or float in [-1, 1] (see
            :func:`to_uint8`), or a ``numpy.ndarray`` shaped ``(T, H, W, 3)`` of ``uint8``.
        path: where to write; parent folders are created. The file appears atomically: frames are encoded
            into a temporary name in the same folder that is renamed over ``path`` only once complete, so a
            reader never sees a half-written video.
        fps: frames per second (fractional rates such as 29.97 are kept as an exact fraction).
        crf: x264 constant rate factor (lower = better); the default keeps tiny videos' colours.
        preset: x264 speed/size preset; it changes file size, hardly the quality at a fixed ``crf``.
        threads: encoder threads. The default 1 makes the bytes independent of the machine's core count
            (x264's output depends on its thread count) and is also the fastest for tiny videos; ``None``
            lets the encoder choose.
        metadata: container tags (the mp4 muxer keeps the standard ones, e.g. ``comment``, ``title``);
            frameloom's samplers record which solver made the video under ``comment``.

    The same ``video`` and arguments give the same bytes (with ``threads`` set): B-frames and x264's
    macroblock tree are off because with them tiny clips did not encode repeatably.

    yuv420p stores colour at half resolution, so H.264 needs an even width and height: odd sizes are padded
    by one row and/or column replicating the edge pixels, i.e. the file is then up to one pixel larger than
    ``video`` in each dimension.
    """
    frames = _pad_even(_as_thwc_uint8(video))
    if frames.shape[0] == 0:
        raise VideoWriteError("video has no frames")
    if not fps or fps <= 0:
        raise VideoWriteError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temporary name: concurrent writers of different files in one folder must not collide. Keeping
    # the .mp4 suffix lets the muxer be picked from the name.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    _, h, w, _ = frames.shape
    try:
        with av.open(str(tmp), mode="w") as container:
            container.metadata.update(metadata or {})
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            options = {"crf": str(int(crf)), "preset": preset, "x264-params": _X264_PARAMS}
            if threads is not None:
                # An encoder option: setting codec_context.thread_count instead did not stop the bytes
                # varying from run to run.
                options["threads"] = str(int(threads))
            stream.options = options
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(tmp, path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise VideoWriteError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file into a ``(T, H, W, 3)`` uint8 RGB array (for tests and scoring)."""
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError) as exc:
        raise FrameloomError(f"cannot decode {path}: {exc}") from exc
    if not frames:
        raise FrameloomError(f"cannot decode {path}: no video frames")
    return np.stack(frames)
