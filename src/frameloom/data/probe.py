"""Video and image metadata, read with PyAV, one file at a time or many in parallel.

``probe_file`` returns the manifest fields of one file (DESIGN.md, "Canonical manifest"); ``probe_many``
runs it over many files in a process pool and sorts the results into good rows and rejects. A file that
cannot be used raises ``ProbeError`` whose ``reason`` is one of ``REASONS``, so reports can count them.

Frame counts are exact: the count is what a full decode of the file yields. It is taken from the
container's sample index where that index can be checked against the file (MP4/MOV, AVI with an index),
and otherwise by demuxing every packet of the video stream (cheap: nothing is decoded). Only the first frame
is decoded, to learn the displayed size and the rotation, and to prove the stream decodes at all.

Conventions:

* ``rotation`` is the clockwise angle, in degrees from {0, 90, 180, 270}, by which the decoded picture must
  be turned for display (the convention of the legacy ``rotate`` tag; a phone's portrait video has 90).
  ``height``/``width`` are the displayed size, i.e. swapped for 90 and 270.
* Images (png, jpg, jpeg, webp, bmp) are one-frame samples with ``fps`` 0.0 and ``duration`` 0.0: an
  image has no frame rate, and 0 makes "is this a video" checks on fps impossible to get wrong by accident.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from frameloom.errors import FrameloomError

REASONS: tuple[str, ...] = ("missing", "empty", "not_media", "no_video_stream", "undecodable")
"""The fixed set of reject reasons (short codes; reports count rows by them)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"})

# Demuxers that treat a single picture as a one-frame "video".
_IMAGE_FORMATS = ("image2", "_pipe")

# Leading bytes of container formats PyAV/FFmpeg reads. Used only to tell "this is not media at all"
# (not_media) from "this is a media file that FFmpeg cannot open" (undecodable, e.g. an MP4 cut before its
# index) when opening fails: FFmpeg reports both as the same "Invalid data" error.
_MAGIC: tuple[tuple[int, bytes], ...] = (
    (4, b"ftyp"),  # MP4 / MOV / M4V / 3GP
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"skip"),
    (4, b"wide"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM (EBML)
    (0, b"RIFF"),  # AVI / WAV / WebP
    (0, b"OggS"),
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),  # MPEG program stream
    (0, b"\x00\x00\x01\xb3"),  # MPEG video elementary stream
    (0, b"\x30\x26\xb2\x75"),  # ASF / WMV
    (0, b"\x89PNG"),
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"GIF8"),
    (0, b"BM"),
    (0, b"ID3"),
    (0, b"fLaC"),
)


class ProbeError(FrameloomError):
    """A file that cannot be a sample. ``reason`` is one of ``REASONS``; ``detail`` says more."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown probe reason {reason!r}; expected one of {REASONS}")
        message = f"cannot use {path}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)
        self.path = str(path)
        self.reason = reason
        self.detail = detail


def _looks_like_media(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if any(head[off : off + len(magic)] == magic for off, magic in _MAGIC):
        return True
    # MPEG transport stream: a sync byte every 188 bytes.
    with open(path, "rb") as fh:
        block = fh.read(188 * 3 + 1)
    return len(block) > 376 and block[0] == block[188] == block[376] == 0x47


def rotation_of(frame: av.VideoFrame, stream: av.video.stream.VideoStream | None = None) -> int:
    """Clockwise display rotation (0/90/180/270) of a decoded frame, from its display matrix.

    PyAV reports the display matrix as a counter-clockwise angle (``VideoFrame.rotation``); the manifest
    uses the clockwise convention of the legacy ``rotate`` tag, which a stream's metadata may still carry
    when the frame has no display matrix.
    """
    ccw = frame.rotation or 0
    if not ccw and stream is not None and "rotate" in stream.metadata:
        try:
            return int(round(float(stream.metadata["rotate"]) / 90.0)) * 90 % 360
        except ValueError:
            return 0
    return int(round(-ccw / 90.0)) * 90 % 360


def _parse_clock(text: str) -> float | None:
    """Matroska's per-track ``DURATION`` tag, e.g. ``00:00:01.667000000``, in seconds."""
    try:
        h, m, s = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError:
        return None


def _declared_duration(stream: av.video.stream.VideoStream) -> float | None:
    """The video stream's own duration as the container states it (not the container's, which may
    include a longer audio track)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    return _parse_clock(tag) if tag else None


def _indexed_frame_count(stream: av.video.stream.VideoStream, path: Path, file_size: int) -> int | None:
    """The stream's stated frame count, if its sample index proves it; None if it must be counted.

    The header count is trusted only when the index has one entry per frame, every entry lies inside the
    file (a file cut short after a front-loaded index still claims all its frames), none is marked to be
    discarded (edit lists), and none is empty (AVI's zero-size "drop" chunks decode to no frame).
    """
    stated = stream.frames
    if stated <= 0:
        return None
    entries = stream.index_entries
    if len(entries) != stated:
        return None
    for entry in entries:
        if entry.pos + entry.size > file_size:
            raise ProbeError(path, "undecodable", "truncated: the index points past the end of the file")
        if entry.size <= 0 or entry.is_discard:
            return None
    return stated


def _fps_of(stream: av.video.stream.VideoStream, num_frames: int, duration: float | None) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    if duration:
        return num_frames / duration
    return 0.0


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise ProbeError(path, "missing") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        reason = "undecodable" if _looks_like_media(path) else "not_media"
        raise ProbeError(path, reason, _short(exc)) from None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    # Cover art in audio files is a one-picture "video" stream flagged attached_pic: not a video.
    streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise ProbeError(path, "no_video_stream", f"streams: {', '.join(kinds)}")
    return streams[0]


def _decode_first(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    file_size: int,
    *,
    count_all: bool,
) -> tuple[av.VideoFrame, int, float | None]:
    """Decode the first frame and, with ``count_all``, demux (not decode) every other packet.

    Returns (first frame, number of packets, end time in seconds of the last packet relative to the stream
    start; the last two are 0 and None without ``count_all``). One packet is one frame for every codec a
    video-diffusion dataset uses; the tests check the count against a full decode for each of them.
    """
    first: av.VideoFrame | None = None
    count = 0
    end_pts: int | None = None
    last_duration = 0
    for packet in container.demux(stream):
        if packet.size == 0:
            # The empty packet at the end flushes decoders that hold frames back (B-frames).
            if first is None:
                frames = packet.decode()
                first = frames[0] if frames else None
            continue
        if packet.is_corrupt or (
            packet.pos is not None and 0 <= packet.pos and packet.pos + packet.size > file_size
        ):
            # A cut-off last packet: some decoders fail on it, others drop it; either way not a whole file.
            raise ProbeError(path, "undecodable", f"truncated or corrupt packet at byte {packet.pos}")
        count += 1
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None and (end_pts is None or ts >= end_pts):
            end_pts, last_duration = ts, packet.duration or 0
        if first is None:
            frames = packet.decode()
            first = frames[0] if frames else None
            if first is not None and not count_all:
                break
    if first is None:
        raise ProbeError(path, "undecodable", "no frame could be decoded")
    end = None
    if end_pts is not None and stream.time_base:
        end = float((end_pts - (stream.start_time or 0) + last_duration) * stream.time_base)
    return first, count, end


def _probe_open(container: av.container.InputContainer, path: Path, file_size: int) -> dict[str, Any]:
    stream = _video_stream(container, path)
    # One thread: probing decodes a single frame, and thread start-up would cost more than the decode.
    stream.codec_context.thread_count = 1
    fmt = container.format.name
    is_image = path.suffix.lower() in IMAGE_SUFFIXES or any(tag in fmt for tag in _IMAGE_FORMATS)
    indexed = None if is_image else _indexed_frame_count(stream, path, file_size)
    # When the index gave the count, stop demuxing as soon as the first frame is out.
    first, counted, packets_end = _decode_first(container, stream, path, file_size, count_all=indexed is None)
    num_frames = 1 if is_image else (indexed if indexed is not None else counted)
    rotation = rotation_of(first, stream)
    height, width = (first.width, first.height) if rotation in (90, 270) else (first.height, first.width)
    if is_image:
        fps, duration = 0.0, 0.0
    else:
        declared = _declared_duration(stream)
        fps = _fps_of(stream, num_frames, declared)
        if indexed is None and declared and packets_end is not None and fps > 0:
            # Matroska/WebM cut short demux cleanly; only the stated duration shows frames are missing.
            missing = declared - packets_end
            if missing > max(1.5 / fps, 0.1):
                raise ProbeError(
                    path, "undecodable", f"truncated: packets end at {packets_end:.2f} s of {declared:.2f} s"
                )
        duration = declared if declared else (num_frames / fps if fps else 0.0)
    return {
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "fps": float(fps),
        "codec": stream.codec_context.name,
        "rotation": int(rotation),
        "duration": float(duration),
        "is_image": bool(is_image),
    }


def probe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Probe one video or image and return its manifest fields.

    Keys: ``path`` (as given), ``num_frames``, ``height``, ``width`` (displayed), ``fps``, ``codec``,
    ``rotation`` (clockwise degrees), ``duration`` (seconds), ``is_image``.
    Raises ``ProbeError`` with ``reason`` in ``REASONS``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ProbeError(p, "missing") from None
    except OSError as exc:
        raise ProbeError(p, "undecodable", _short(exc)) from None
    if not p.is_file():
        raise ProbeError(p, "not_media", "not a regular file")
    if size == 0:
        raise ProbeError(p, "empty", "zero bytes")
    container = _open(p)
    try:
        fields = _probe_open(container, p, size)
    except ProbeError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise ProbeError(p, "undecodable", _short(exc)) from None
    finally:
        container.close()
    return {"path": str(path), **fields}


def _probe_one(path: str) -> tuple[bool, Any]:
    """Pool worker: never raises, so one bad file cannot stop the others."""
    try:
        return True, probe_file(path)
    except ProbeError as exc:
        return False, (str(path), exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - anything else is still just a file we cannot use
        return False, (str(path), "undecodable", f"{type(exc).__name__}: {_short(exc)}")


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and they inherit the imported PyAV; spawn elsewhere (macOS,
    # Windows), where fork is unavailable or unsafe.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and os.name == "posix" else "spawn")


def _results(paths: Sequence[str], workers: int) -> Iterator[tuple[bool, Any]]:
    if workers <= 1 or len(paths) <= 1:
        yield from map(_probe_one, paths)
        return
    workers = min(workers, len(paths))
    # Chunks amortise the inter-process round trip (a small clip probes in about a millisecond) while
    # staying small enough that the progress bar moves and the workers finish together.
    chunksize = max(1, min(32, len(paths) // (workers * 8)))
    with _pool_context().Pool(workers) as pool:
        yield from pool.imap(_probe_one, paths, chunksize=chunksize)


def probe_many(
    paths: Iterable[str | os.PathLike], workers: int = 1, progress: bool = True
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """Probe many files, ``workers`` processes at a time (1: in this process), with a progress bar.

    Returns (rows of the good files in input order, rejects as ``(path, reason, detail)`` in input order).
    A bad file never raises; it becomes a reject.
    """
    paths = [str(p) for p in paths]
    good: list[dict[str, Any]] = []
    rejects: list[tuple[str, str, str]] = []
    with tqdm(total=len(paths), desc="probing", unit="file", disable=not progress) as bar:
        for ok, value in _results(paths, workers):
            (good if ok else rejects).append(value)
            bar.update(1)
    return good, rejects


__all__ = [
    "IMAGE_SUFFIXES",
    "REASONS",
    "VIDEO_SUFFIXES",
    "ProbeError",
    "probe_file",
    "probe_many",
    "rotation_of",
]
