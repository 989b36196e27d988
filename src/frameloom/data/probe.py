"""Video and image metadata, read with PyAV, one file at a time or many in parallel.

``probe_file`` returns the manifest fields of one file (DESIGN.md, "Canonical manifest"); ``probe_many``
runs it over many files in a process pool and sorts the results into good rows and rejects. A file that
cannot be used raises ``ProbeError`` whose ``reason`` is one of ``REASONS``, so reports can count them.

Frame counts are exact: the count is what a full decode of the file yields. It is taken from the
container's sample index where that index can be checked against the file (MP4/MOV, AVI with an index),
and otherwise by demuxing every packet of the video stream (cheap: nothing is decoded).

What is decoded: for indexed MP4/MOV/AVI nothing at all (size from the container, rotation from the MP4
track header), since on small clips the first frame's decode would be most of the probe's cost; for every
other file the first frame, which gives the decoder's size and rotation and proves that the stream decodes.
So a probe checks a file's structure (an index that lies inside the file, intact packets, a stated duration
the packets reach); damage inside the pixel data of an intact MP4 surfaces later, as ``DecodeError``.

Conventions:

* ``rotation`` is the clockwise angle, in degrees from {0, 90, 180, 270}, by which the decoded picture must
  be turned for display (the convention of the legacy ``rotate`` tag; a phone's portrait video has 90).
  ``height``/``width`` are the displayed size, i.e. swapped for 90 and 270.
* Images (png, jpg, jpeg, webp, bmp) are one-frame samples with ``fps`` 0.0 and ``duration`` 0.0: an
  image has no frame rate, and 0 makes "is this a video" checks on fps impossible to get wrong by accident.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO

import av
from tqdm import tqdm

from frameloom.errors import FrameloomError

REASONS: tuple[str, ...] = ("missing", "empty", "not_media", "no_video_stream", "undecodable")
"""The fixed set of reject reasons (short codes; reports count rows by them)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    {
        ".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ogv", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts",
        ".mts", ".flv", ".f4v", ".wmv", ".asf", ".3gp", ".3g2", ".mxf", ".y4m", ".vob", ".dv",
    }
)  # fmt: skip
"""Suffixes of the containers FFmpeg reads that commonly hold video; other files are probed to find out."""

# Demuxers that read any text as "video" (ANSI art, binary text): a caption file is never a video.
_TEXT_FORMATS = ("tty", "bin", "xbin", "adf", "idf")

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
    try:
        with open(path, "rb") as fh:
            head = fh.read(188 * 2 + 1)
    except OSError:
        return False
    if any(head[off : off + len(magic)] == magic for off, magic in _MAGIC):
        return True
    # MPEG transport stream: a sync byte every 188 bytes.
    return len(head) > 376 and head[0] == head[188] == head[376] == 0x47


def rotation_of(frame: av.VideoFrame, stream: av.video.stream.VideoStream | None = None) -> int:
    """Clockwise display rotation (0/90/180/270) of a decoded frame, from its display matrix.

    PyAV reports the display matrix as a counter-clockwise angle (``VideoFrame.rotation``); the manifest
    uses the clockwise convention of the legacy ``rotate`` tag, which a stream's metadata may still carry
    when the frame has no display matrix.
    """
    ccw = frame.rotation or 0
    if not ccw and stream is not None:
        return _metadata_rotation(stream)
    return int(round(-ccw / 90.0)) * 90 % 360


def _metadata_rotation(stream: av.video.stream.VideoStream) -> int:
    try:
        return int(round(float(stream.metadata.get("rotate", 0)) / 90.0)) * 90 % 360
    except ValueError:
        return 0


def _boxes(fh: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISO-BMFF boxes between byte offsets ``start`` and ``end``: (type, payload start, box end)."""
    pos = start
    while pos + 8 <= end:
        fh.seek(pos)
        header = fh.read(16)
        if len(header) < 8:
            return
        size, kind = struct.unpack(">I4s", header[:8])
        skip = 8
        if size == 1 and len(header) == 16:  # 64-bit size follows
            size, skip = struct.unpack(">Q", header[8:16])[0], 16
        elif size == 0:  # extends to the end
            size = end - pos
        if size < skip:
            return
        yield kind, pos + skip, min(pos + size, end)
        pos += size


def _mov_rotation(path: Path, track_id: int, file_size: int) -> int:
    """Clockwise rotation from the MP4/MOV track header (``tkhd``) matrix of track ``track_id``.

    PyAV exposes a file's display matrix only on decoded frames; reading the 36 matrix bytes lets the probe
    skip decoding for MP4, which is most of its cost on small clips. The rotation is ``atan2(b, a)`` of the
    matrix [[a, b, u], [c, d, v], [x, y, w]], the same angle FFmpeg reports (with the opposite sign, as
    FFmpeg's is counter-clockwise). The movie header's matrix (almost always identity) is ignored.
    """
    with open(path, "rb") as fh:
        for kind, start, end in _boxes(fh, 0, file_size):
            if kind != b"moov":
                continue
            for trak, t_start, t_end in _boxes(fh, start, end):
                if trak != b"trak":
                    continue
                for box, b_start, _ in _boxes(fh, t_start, t_end):
                    if box != b"tkhd":
                        continue
                    fh.seek(b_start)
                    body = fh.read(88)
                    id_at, matrix_at = (20, 52) if body[:1] == b"\x01" else (12, 40)
                    if len(body) < matrix_at + 36:
                        break
                    if struct.unpack(">I", body[id_at : id_at + 4])[0] != track_id:
                        break
                    a, b = struct.unpack(">ii", body[matrix_at : matrix_at + 8])
                    return int(round(math.degrees(math.atan2(b, a)) / 90.0)) * 90 % 360
            return 0
    return 0


def _parse_clock(text: str) -> float | None:
    """Matroska's per-track ``DURATION`` tag, e.g. ``00:00:01.667000000``, in seconds."""
    try:
        h, m, s = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError:
        return None


def _tagged_duration(stream: av.video.stream.VideoStream) -> float | None:
    """The video track's own duration as a Matroska/WebM muxer recorded it (the per-track ``DURATION`` tag).

    Not the container's duration (it may include a longer audio track), and not FFmpeg's estimate for
    formats that state none (MPEG-TS, FLV), which is what ``stream.duration`` holds for those.
    """
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


def _nominal_rate(stream: av.video.stream.VideoStream) -> float:
    """The frame rate the container states (average, else FFmpeg's guess); 0.0 if neither is known."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    return 0.0


def _fps_of(nominal: float, measured: float | None) -> float:
    """The stated rate, unless the frames actually present say otherwise (by more than 2%).

    For variable-frame-rate files, and containers whose header rate is only the muxer's default or a guess
    (Matroska, MPEG-TS), the stated rate can be far from the real one; then the measured average is used, so
    that frame indices 0 .. num_frames-1 cover the whole video. The tolerance keeps exact rates such as
    30000/1001 where timestamps are merely rounded (Matroska's milliseconds).
    """
    if measured and (not nominal or abs(measured / nominal - 1.0) > 0.02):
        return measured
    return nominal


# av.open runs FFmpeg's stream analysis (avformat_find_stream_info), which decodes frames to fill in codec
# parameters: for H.264 up to 20 of them, just to guess the reordering delay. Nothing here needs those
# parameters (frames are decoded again anyway, and sizes/rates/timestamps come from the container), so the
# analysis decoders skip every frame and read as little as possible. For small clips this is most of the
# cost of opening a file.
_QUICK_OPEN = {"skip_frame": "all", "probesize": "32"}


def open_input(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file for reading without FFmpeg's frame-decoding stream analysis.

    Containers that reveal their streams or frame rate only by reading packets (MPEG-TS/PS) show no sized
    video stream with a rate after the quick open; they are reopened with the full analysis (as are images
    and audio-only files, cheaply). Raises PyAV's errors unchanged.
    """
    container = av.open(str(path), options=_QUICK_OPEN, metadata_errors="ignore")
    if any(s.width > 0 and s.average_rate for s in container.streams.video):
        return container
    container.close()
    return av.open(str(path), metadata_errors="ignore")


def _open(path: Path) -> av.container.InputContainer:
    try:
        return open_input(path)
    except av.error.FileNotFoundError:
        raise ProbeError(path, "missing") from None
    except (av.error.PermissionError, av.error.IsADirectoryError) as exc:
        raise ProbeError(path, "undecodable", _short(exc)) from None
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        reason = "undecodable" if _looks_like_media(path) else "not_media"
        raise ProbeError(path, reason, _short(exc)) from None


def _short(exc: BaseException) -> str:
    """One line for a report: FFmpeg's own message without the errno and file name PyAV adds."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if any(name in _TEXT_FORMATS for name in container.format.name.split(",")):
        raise ProbeError(path, "not_media", f"FFmpeg reads it only as text art ({container.format.name})")
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
) -> tuple[av.VideoFrame, int, float | None, float]:
    """Decode the first frame and, with ``count_all``, demux (not decode) every other packet.

    Returns (first frame, number of packets, start time and duration in seconds of the last-shown packet,
    the start relative to the first-shown one). Without ``count_all`` only the first is meaningful (the
    rest are the packets read so far, None and 0.0). One packet is one frame for every codec a
    video-diffusion dataset uses; the tests check the count against a full decode for each of them.
    """
    first: av.VideoFrame | None = None
    count = 0
    start_pts: int | None = None
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
        ts = packet.pts  # presentation time; some containers (MPEG-PS) leave it out on some packets
        if ts is not None:
            start_pts = ts if start_pts is None else min(start_pts, ts)
            if end_pts is None or ts >= end_pts:
                end_pts, last_duration = ts, packet.duration or 0
        if first is None:
            frames = packet.decode()
            first = frames[0] if frames else None
            if first is not None and not count_all:
                break
    if first is None:
        raise ProbeError(path, "undecodable", "no frame could be decoded")
    if not count_all or end_pts is None or not stream.time_base:
        return first, count, None, 0.0
    last_start = float((end_pts - start_pts) * stream.time_base)
    return first, count, last_start, float(last_duration * stream.time_base)


def _measured_timing(
    stream: av.video.stream.VideoStream,
    path: Path,
    num_frames: int,
    last_start: float | None,
    last_duration: float,
) -> tuple[float, float]:
    """(fps, duration) of a stream whose packets were all demuxed, from their timestamps.

    The measured rate is (frames - 1) / (time of the last frame): exact for constant frame rate whatever the
    last frame's duration, and for variable frame rate it puts index num_frames-1 on the last frame.
    """
    nominal = _nominal_rate(stream)
    measured = (num_frames - 1) / last_start if last_start and num_frames > 1 else None
    fps = _fps_of(nominal, measured)
    if last_start is None:
        return fps, (num_frames / fps if fps else 0.0)
    duration = last_start + (last_duration or (1.0 / fps if fps else 0.0))
    tagged = _tagged_duration(stream)
    # Matroska/WebM cut short demux cleanly; only the recorded duration shows that frames are missing.
    if tagged and tagged - duration > max(1.5 / fps if fps else 0.0, 0.1):
        raise ProbeError(path, "undecodable", f"truncated: packets end at {duration:.2f} s of {tagged:.2f} s")
    return fps, duration


def _probe_open(container: av.container.InputContainer, path: Path, file_size: int) -> dict[str, Any]:
    stream = _video_stream(container, path)
    codec = stream.codec_context
    if codec is None:
        raise ProbeError(path, "undecodable", "this FFmpeg build has no decoder for the video codec")
    # One thread: probing decodes at most a single frame; thread start-up would cost more than the decode.
    codec.thread_count = 1
    fmt = container.format.name
    is_image = path.suffix.lower() in IMAGE_SUFFIXES or any(tag in fmt for tag in _IMAGE_FORMATS)
    indexed = None if is_image else _indexed_frame_count(stream, path, file_size)
    last_start, last_duration = None, 0.0
    family = "mov" if "mov" in fmt.split(",") else fmt
    if indexed is not None and family in ("mov", "avi") and codec.width > 0 and codec.height > 0:
        # The sample index gave the count and the container gives size and rotation: no decoding at all.
        # (Pixel-level damage in an intact container shows up as a DecodeError when the clip is decoded.)
        rotation = _mov_rotation(path, stream.id, file_size) if family == "mov" else 0
        rotation = rotation or _metadata_rotation(stream)
        stored_height, stored_width = codec.height, codec.width
        num_frames = indexed
    else:
        # Decode the first frame (size and rotation as the decoder sees them) and, without an index, count
        # the packets; stop after the first frame when the index already gave the count.
        first, counted, last_start, last_duration = _decode_first(
            container, stream, path, file_size, count_all=indexed is None
        )
        num_frames = 1 if is_image else (indexed if indexed is not None else counted)
        rotation = rotation_of(first, stream)
        stored_height, stored_width = first.height, first.width
    height, width = (stored_width, stored_height) if rotation in (90, 270) else (stored_height, stored_width)
    if is_image:
        fps, duration = 0.0, 0.0
    elif indexed is not None:
        # The container's sample table states the duration (MP4: the sum of sample durations, from which
        # FFmpeg also derives the average rate).
        nominal = _nominal_rate(stream)
        stated = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        fps = _fps_of(nominal, num_frames / stated if stated else None)
        duration = stated or (num_frames / fps if fps else 0.0)
    else:
        fps, duration = _measured_timing(stream, path, num_frames, last_start, last_duration)
    return {
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "fps": float(fps),
        "codec": codec.name,
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
    # fork starts workers in milliseconds, already holding the imported PyAV; elsewhere (macOS, Windows)
    # fork is unavailable or unsafe, and spawn is used.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _results(paths: Sequence[str], workers: int) -> Iterator[tuple[bool, Any]]:
    if workers <= 1 or len(paths) <= 1:
        yield from map(_probe_one, paths)
        return
    workers = min(workers, len(paths))
    # Chunks amortise the inter-process round trip (a small clip probes in under a millisecond) while
    # staying small enough that the progress bar moves and the workers finish together.
    chunksize = max(1, min(32, len(paths) // (workers * 8)))
    # An executor rather than multiprocessing.Pool: if FFmpeg crashes a worker, Pool waits forever for the
    # lost task, while the executor raises BrokenProcessPool.
    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        try:
            yield from pool.map(_probe_one, paths, chunksize=chunksize)
        except BrokenProcessPool:
            raise FrameloomError(
                "a probing worker process died (FFmpeg crashed on some file); "
                "rerun with --workers 1 to see which file"
            ) from None


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
    "open_input",
    "probe_file",
    "probe_many",
    "rotation_of",
]
