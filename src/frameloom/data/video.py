"""Frame-index selection and seek-based decoding of one clip from a manifest row.

``frame_indices`` is the pure choice of source frames (start, stride or target fps, the seeds' frame rules);
``read_frames`` decodes those frames by seeking to the keyframe before the first one; ``decode_clip`` turns a
manifest row and a ``ClipSpec`` into a (C, T, H, W) tensor as displayed (rotation, crop, aspect-preserving
resize). ``DecodeError`` and ``ClipSpec`` are a fixed interface the cache keys and the trainer rely on.

Frame rules of the seed systems (SEED_FACTS.md), each a small pure function here:

- Open-Sora: integer stride ``ceil(fps / fps_max)`` (``opensora_stride``), random temporal crop, 4k+1 counts;
- Open-Sora-Plan: float stride ``fps / train_fps`` from ``cut[0]`` (``target_fps``; ``decode_clip`` counts
  from ``cut_start``), ``speed_factor`` subsampling (``speed_positions``), random temporal crop, then
  truncation to the largest valid count (policy ``opensora_plan``, with the sequence-parallel size);
- CogVideoX: 8N+1 frames (policy ``8n+1``); Pyramid Flow: 8x temporal VAE, video frames (n-1)//8*8+1
  (policy ``pyramid``).

Random choices (the temporal crop) are pure functions of (seed, sample index, epoch), so a resumed or
re-sharded run draws exactly the same clips.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
import torch.nn.functional as F

from frameloom.data.probe import IMAGE_SUFFIXES, open_input, rotation_of
from frameloom.errors import FrameloomError


class DecodeError(FrameloomError):
    """A clip could not be decoded. Carries the file's path and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode {path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ClipSpec:
    """What to take from a video: which frames, which region, at which size.

    At most one of ``frame_stride`` (in source frames, may be fractional), ``target_fps`` (float stride
    ``fps / target_fps``, Open-Sora-Plan) and ``fps_max`` (integer stride ``ceil(fps / fps_max)``, Open-Sora)
    may be set; none means stride 1. ``crop`` is (x0, x1, y0, y1) in displayed pixels, applied before
    resizing. ``height``/``width`` None keeps the source size. Resizing keeps the aspect ratio and
    center-crops.

    ``speed_factor`` > 1 subsamples the strided frames further (Open-Sora-Plan), capped by the positions per
    ``speed_frames`` (the run's ``data.num_frames``; default ``num_frames``: a bucket's clip may be shorter
    than the count the seed divides by). ``frame_spread`` (CogVideoX, with no stride rule) spreads the clip
    over the whole video: stride ``N // num_frames`` for N source frames. ``temporal_crop`` is
    ``"start"`` (the clip begins at ``start_frame``) or ``"random"`` (a window drawn per (seed, sample,
    epoch)). ``frame_policy`` (one of ``FRAME_POLICIES``) makes ``num_frames`` a maximum: a shorter video
    gives a shorter clip, cut to the policy's largest valid count (``valid_length``); ``sp_size`` is the
    sequence-parallel size the ``opensora_plan`` policy needs. Without a policy the clip has exactly
    ``num_frames`` frames or is an error.
    """

    num_frames: int
    frame_stride: float | None = None
    target_fps: float | None = None
    start_frame: int = 0
    crop: tuple[int, int, int, int] | None = None
    height: int | None = None
    width: int | None = None
    fps_max: float | None = None
    speed_factor: float = 1.0
    temporal_crop: str = "start"
    frame_policy: str | None = None
    sp_size: int = 1
    speed_frames: int | None = None
    frame_spread: bool = False
    resize: str = "cover"
    """``cover`` (antialiased bilinear resize to cover, then center crop) or ``adm`` (DiT/ADM's
    ``center_crop_arr``: BOX halvings, BICUBIC to the short side, center crop; square sizes; data/image_ops.py)."""
    hflip: bool = False
    """Mirror the clip left-right with probability 1/2, drawn per (seed, sample, epoch) (DiT's
    RandomHorizontalFlip; the cache, which has no epoch, draws once per file: fast-DiT's extraction)."""

    def key(self) -> str:
        """A stable text form, used in cache keys. Fields at their defaults add nothing, so the keys of
        specs written before a field existed stay the same."""
        text = (
            f"f{self.num_frames}-s{self.frame_stride}-fps{self.target_fps}-st{self.start_frame}"
            f"-c{self.crop}-{self.height}x{self.width}"
        )
        if self.fps_max is not None:
            text += f"-fmax{self.fps_max}"
        if self.speed_factor != 1.0:
            text += f"-sf{self.speed_factor}"
        if self.temporal_crop != "start":
            text += f"-tc{self.temporal_crop}"
        if self.frame_policy is not None:
            text += f"-p{self.frame_policy}-sp{self.sp_size}"
        if self.speed_frames is not None and self.speed_factor != 1.0:
            text += f"-sfn{self.speed_frames}"
        if self.frame_spread:
            text += "-spread"
        if self.resize != "cover":
            text += f"-rs{self.resize}"
        if self.hflip:
            text += "-hflip"
        return text


# ---------------------------------------------------------------------------------------- frame choice

FRAME_POLICIES: tuple[str, ...] = ("4k+1", "8n+1", "opensora_plan", "pyramid")
"""Valid-length rules, by name (see ``is_valid_length``)."""
TEMPORAL_CROPS: tuple[str, ...] = ("start", "random")

# Temporal compression of the VAE each policy is for: latent frames = (n - 1) // c + 1.
_COMPRESSION = {"4k+1": 4, "8n+1": 8, "opensora_plan": 4, "pyramid": 8}
# Open-Sora-Plan's shortest clip (find_closest_y returns -1 below 29 frames).
OPENSORA_PLAN_MIN_FRAMES = 29


class ClipError(FrameloomError, ValueError):
    """A clip spec that cannot be met: an invalid spec, or a video with fewer frames than it needs."""


def _check_policy(policy: str, sp_size: int = 1) -> None:
    if policy not in _COMPRESSION:
        raise ClipError(f"unknown frame policy {policy!r}; expected one of {', '.join(FRAME_POLICIES)}")
    if sp_size < 1:
        raise ClipError(f"sp_size must be at least 1, got {sp_size}")


def latent_length(num_frames: int, policy: str) -> int:
    """Latent frames of a clip under a policy's VAE: ``(n - 1) // c + 1`` (c = 4 for 4k+1 and
    opensora_plan, 8 for 8n+1 and pyramid; causal video VAEs keep the first frame on its own)."""
    _check_policy(policy)
    return (num_frames - 1) // _COMPRESSION[policy] + 1


def _latent_divisor(policy: str, sp_size: int) -> int:
    """What the latent length must be a multiple of: the sequence-parallel size for ``opensora_plan``
    (v1.3 calls ``find_closest_y(..., model_ds_t=sp_size)``: each rank of an sp group holds whole latent
    frames), 1 otherwise."""
    return sp_size if policy == "opensora_plan" else 1


def is_valid_length(num_frames: int, policy: str, sp_size: int = 1) -> bool:
    """Whether a clip of ``num_frames`` frames is valid under ``policy`` (SEED_FACTS.md):

    - ``4k+1`` (Open-Sora): ``(n - 1) % 4 == 0``;
    - ``8n+1`` (CogVideoX): ``(n - 1) % 8 == 0``;
    - ``opensora_plan``: ``n >= 29``, ``(n - 1) % 4 == 0`` and the latent length ``(n - 1) // 4 + 1``
      divisible by ``sp_size`` (sp 1: 29, 33, 37 ...; sp 4: 29, 45, 61, 77, 93 ...; sp 8: 29, 61, 93 ...);
    - ``pyramid`` (Pyramid Flow, 8x temporal VAE): ``(n - 1) % 8 == 0``, i.e. latent length ``(n - 1) // 8 + 1``.
    """
    _check_policy(policy, sp_size)
    c = _COMPRESSION[policy]
    if num_frames < 1 or (num_frames - 1) % c:
        return False
    if policy == "opensora_plan":
        if num_frames < OPENSORA_PLAN_MIN_FRAMES:
            return False
        return latent_length(num_frames, policy) % _latent_divisor(policy, sp_size) == 0
    return True


def valid_length(num_frames: int, policy: str, sp_size: int = 1) -> int:
    """The largest valid count <= ``num_frames`` under ``policy`` (0 when there is none).

    For 4k+1 / 8n+1 / pyramid: ``n - (n - 1) % c`` (Pyramid Flow's ``(n - 1) // 8 * 8 + 1``). For
    opensora_plan, Open-Sora-Plan's ``find_closest_y`` in closed form: the largest latent length
    ``L <= (n - 1) // 4 + 1`` that is a multiple of ``sp_size``, giving ``4 (L - 1) + 1`` frames, and 0
    below 29 frames. Example: 92 frames -> latent <= 23 -> sp 1: 89 frames; sp 4: 20 -> 77; sp 8: 16 -> 61.
    """
    _check_policy(policy, sp_size)
    if num_frames < 1:
        return 0
    c = _COMPRESSION[policy]
    n = num_frames - (num_frames - 1) % c
    if policy == "opensora_plan":
        d = _latent_divisor(policy, sp_size)
        latent = (n - 1) // c + 1
        latent -= latent % d
        n = c * (latent - 1) + 1 if latent >= 1 else 0
        return n if n >= OPENSORA_PLAN_MIN_FRAMES else 0
    return n


def check_length(num_frames: int, policy: str, sp_size: int = 1) -> None:
    """Raise ``ClipError`` naming the nearest valid counts when ``num_frames`` is not valid under ``policy``."""
    if is_valid_length(num_frames, policy, sp_size):
        return
    below = valid_length(num_frames, policy, sp_size)
    above = num_frames + 1
    while not is_valid_length(above, policy, sp_size):  # valid counts recur every c * sp_size frames
        above += 1
    nearest = f"{below} or {above}" if below else str(above)
    raise ClipError(
        f"num_frames={num_frames} is not valid under frame policy {policy} (sp_size {sp_size}); "
        f"nearest valid: {nearest}"
    )


def opensora_stride(source_fps: float, fps_max: float) -> int:
    """Open-Sora's integer frame stride ``ceil(fps / fps_max)`` (never below 1).

    Example: 60 fps with fps_max 24 -> ceil(2.5) = 3; 24 fps -> 1; 29.97 fps with fps_max 30 -> 1; an
    unknown rate (0) -> 1.
    The 1e-9 keeps a ratio that is an integer up to float error (e.g. 48 / 24) from rounding up.
    """
    if fps_max <= 0:
        raise ClipError(f"fps_max must be positive, got {fps_max}")
    if not source_fps or source_fps <= 0:
        return 1  # unknown rate: every frame (as data/buckets.py counts usable frames)
    return max(1, math.ceil(source_fps / fps_max - 1e-9))


def clip_stride(source_fps: float, spec: ClipSpec) -> float:
    """Source frames per clip frame: ``spec.frame_stride``, or ``source_fps / spec.target_fps``
    (Open-Sora-Plan's float stride), or ``ceil(source_fps / spec.fps_max)`` (Open-Sora), or 1."""
    given = [n for n in ("frame_stride", "target_fps", "fps_max") if getattr(spec, n) is not None]
    if len(given) > 1:
        raise ClipError(f"set at most one of frame_stride, target_fps and fps_max (got {', '.join(given)})")
    if spec.frame_stride is not None:
        if spec.frame_stride <= 0:
            raise ClipError(f"frame_stride must be positive, got {spec.frame_stride}")
        return float(spec.frame_stride)
    if spec.target_fps is not None:
        if spec.target_fps <= 0:
            raise ClipError(f"target_fps must be positive, got {spec.target_fps}")
        if not source_fps or source_fps <= 0:
            raise ClipError("target_fps needs the source frame rate, but the row has fps 0 or none")
        return float(source_fps) / float(spec.target_fps)
    if spec.fps_max is not None:
        return float(opensora_stride(source_fps, spec.fps_max))
    return 1.0


def speed_positions(num_positions: int, num_frames: int, speed_factor: float) -> np.ndarray:
    """Open-Sora-Plan's ``speed_factor``: which of ``num_positions`` strided frames to keep.

    With ``speed_factor > 1`` and more positions than the clip needs, the effective factor is
    ``sf = min(speed_factor, num_positions / num_frames)`` and ``int(num_positions / sf)`` positions are
    spread evenly: ``floor(linspace(0, num_positions - 1, count))``. Otherwise all positions are kept.
    (The count is kept >= num_frames: float error in ``P / (P / n)`` could otherwise lose one frame.)

    Example: 40 positions, 10 frames, speed 2 -> 20 positions 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
    26, 28, 30, 32, 34, 36, 39 (linspace step 39 / 19 = 2.05).
    """
    if speed_factor < 1:
        raise ClipError(f"speed_factor must be >= 1, got {speed_factor}")
    if speed_factor > 1 and num_positions > num_frames:
        sf = min(float(speed_factor), num_positions / num_frames)
        count = max(int(num_positions / sf), num_frames)
        return np.floor(np.linspace(0, num_positions - 1, count)).astype(np.int64)
    return np.arange(num_positions, dtype=np.int64)


def sampled_fps(source_fps: float, num_source_frames: int, spec: ClipSpec) -> float | None:
    """The frame rate of the frames a clip feeds the model (pure function; the RoPE time scale of LTX-Video).

    ``source_fps / clip_stride(source_fps, spec)`` (``target_fps`` gives exactly ``target_fps``; a stride of
    2 on a 30 fps file 15). Further subsampling divides by its mean step: ``frame_spread`` takes every
    ``N // num_frames``-th frame, and a ``speed_factor`` that keeps ``k`` of ``P`` strided positions
    (``speed_positions``: ``floor(linspace(0, P - 1, k))``) steps ``(P - 1) / (k - 1)`` positions on average.
    None when the rate is unknown (fps 0 or missing). ``num_source_frames`` counts from the cut's start, as
    ``frame_indices`` does; a temporal crop moves the window, not its rate.

    Example: 30 fps, ``frame_stride`` 2 -> 15.0; 30 fps, ``target_fps`` 12 -> 12.0.
    """
    if not source_fps or not math.isfinite(source_fps) or source_fps <= 0:
        return None
    if spec.frame_spread:
        step = (num_source_frames - spec.start_frame) // spec.num_frames
        return float(source_fps) / step if step >= 1 else None
    stride = clip_stride(source_fps, spec)
    rate = float(source_fps) / stride
    if spec.speed_factor > 1:
        room = num_source_frames - spec.start_frame - 1e-6
        count = math.ceil(room / stride) if room > 0 else 0
        kept = len(speed_positions(count, spec.speed_frames or spec.num_frames, spec.speed_factor))
        if 1 < kept < count:
            rate /= (count - 1) / (kept - 1)
    return rate


def row_fps(row: Mapping[str, Any], spec: ClipSpec) -> float | None:
    """``sampled_fps`` of a manifest row decoded at ``spec`` (as ``decode_clip`` reads the row: ``fps``,
    ``num_frames``, ``cut_start``/``cut_end``); None for images and rows without a frame rate."""
    is_image = bool(row.get("is_image")) or Path(str(row.get("path", ""))).suffix.lower() in IMAGE_SUFFIXES
    fps = row.get("fps")
    if is_image or fps is None:
        return None
    cut_start = int(row.get("cut_start") or 0)
    cut_end = row.get("cut_end")
    available = (int(cut_end) if cut_end is not None else int(row.get("num_frames") or 0)) - cut_start
    try:
        return sampled_fps(float(fps), available, spec)
    except ClipError:  # an impossible spec fails where the clip is decoded, with its own message
        return None


def row_fps_or_nan(row: Mapping[str, Any], spec: ClipSpec) -> float:
    """``row_fps`` as the float a batch carries: NaN where the rate is unknown (the trainer then uses the
    family's fallback rate, ``objectives.with_clip_frame_rates``)."""
    rate = row_fps(row, spec)
    return float("nan") if rate is None else rate


def draw_int(low: int, high: int, seed: int, index: int, epoch: int, salt: str) -> int:
    """A uniform integer in [low, high], a pure function of (seed, sample index, epoch, salt).

    blake2b of the four values: no RNG state, so any process, in any order, after any resume, draws the
    same number for the same sample and epoch (the modulo bias of a 64-bit hash is below 1e-15 here).
    """
    if high < low:
        raise ValueError(f"empty range [{low}, {high}]")
    digest = hashlib.blake2b(
        salt.encode() + struct.pack("<3q", int(seed), int(index), int(epoch)), digest_size=8
    ).digest()
    return low + int.from_bytes(digest, "little") % (high - low + 1)


def temporal_crop_offset(num_positions: int, window: int, draw: tuple[int, int, int]) -> int:
    """First position of a random temporal crop of ``window`` out of ``num_positions``.

    Uniform over ``[0, max(0, num_positions - window - 1)]``: the range of both seeds' ``TemporalRandomCrop``
    (``random.randint(0, max(0, total - size - 1))``; the last possible window is never drawn, and a video
    one position longer than the window always starts at 0), drawn from ``draw = (seed, sample index,
    epoch)`` by ``draw_int`` instead of a global RNG.
    """
    top = max(0, num_positions - window - 1)
    if top == 0:
        return 0
    seed, index, epoch = draw
    return draw_int(0, top, seed, index, epoch, "temporal_crop")


def frame_indices(
    num_source_frames: int,
    source_fps: float,
    spec: ClipSpec,
    *,
    draw: tuple[int, int, int] | None = None,
) -> list[int]:
    """The source frame indices of a clip (pure function).

    Position ``p`` on the strided grid is source frame ``floor(spec.start_frame + p * stride + 1e-6)``
    with the stride of ``clip_stride``. Rounding down keeps every index inside the span the stride
    promises (Open-Sora-Plan's ``np.arange(start, end, interval).astype(int)``); the 1e-6 absorbs float
    error, so that e.g. a stride of 0.1 * 10 lands on 1, not 0. A stride below 1 (target fps above the
    source's) repeats frames.

    Example: 30 fps to 12 fps (stride 2.5) from frame 5 gives 5, 7, 10, 12, 15, 17, ...

    With the default ``speed_factor`` 1, ``temporal_crop`` "start" and no ``frame_policy``, the clip is
    positions 0 .. num_frames - 1. Otherwise, in the seeds' order (Open-Sora-Plan's ``get_actual_frame``):
    1. all positions inside the video; 2. ``speed_positions`` keeps some of them; 3. a window of
    ``min(num_frames, positions)`` starts at 0 ("start") or at ``temporal_crop_offset(..., draw)``
    ("random", ``draw = (seed, sample index, epoch)``); 4. with a ``frame_policy`` the window is cut to
    ``valid_length`` (its head is kept), without one it must hold ``num_frames``.

    Raises ``ClipError`` for an invalid spec or when the video has fewer frames than the clip needs.
    """
    if spec.num_frames < 1:
        raise ClipError(f"num_frames must be at least 1, got {spec.num_frames}")
    if spec.start_frame < 0:
        raise ClipError(f"start_frame must be >= 0, got {spec.start_frame}")
    if spec.temporal_crop not in TEMPORAL_CROPS:
        raise ClipError(
            f"temporal_crop must be one of {', '.join(TEMPORAL_CROPS)}, got {spec.temporal_crop!r}"
        )
    if spec.frame_policy is not None:
        _check_policy(spec.frame_policy, spec.sp_size)
    start = spec.start_frame
    if spec.frame_spread:
        return _spread(num_source_frames, spec)
    stride = clip_stride(source_fps, spec)

    def index(p: int) -> int:
        return math.floor(start + p * stride + 1e-6)

    plain = spec.speed_factor == 1 and spec.temporal_crop == "start" and spec.frame_policy is None
    if plain:
        indices = [index(i) for i in range(spec.num_frames)]
        if indices[-1] >= num_source_frames:
            raise ClipError(
                f"the clip needs source frames {indices[0]}..{indices[-1]} (num_frames={spec.num_frames}, "
                f"stride={stride:g}, start={spec.start_frame}) but the video has {num_source_frames}"
            )
        return indices

    # 1. Positions p with index(p) < N: start + p * stride + 1e-6 < N.
    room = num_source_frames - start - 1e-6
    count = math.ceil(room / stride) if room > 0 else 0
    # 2. Speed factor (capped by the positions per data.num_frames, as the seed divides by it).
    positions = speed_positions(count, spec.speed_frames or spec.num_frames, spec.speed_factor)
    window = min(spec.num_frames, len(positions))
    # 4 (decided before the crop: the policy cuts the window's head).
    if spec.frame_policy is None:
        if len(positions) < spec.num_frames:
            raise ClipError(
                f"the clip needs {spec.num_frames} frames at stride {stride:g} from frame {start}, but the "
                f"video has {num_source_frames} frames ({len(positions)} usable)"
            )
        length = spec.num_frames
    else:
        length = valid_length(window, spec.frame_policy, spec.sp_size)
        if length == 0:
            raise ClipError(
                f"the video gives {len(positions)} frames at stride {stride:g}, fewer than the shortest clip "
                f"valid under frame policy {spec.frame_policy} (sp_size {spec.sp_size})"
            )
    # 3. Temporal crop.
    offset = 0
    if spec.temporal_crop == "random":
        if draw is None:
            raise ClipError("temporal_crop 'random' needs draw=(seed, sample index, epoch)")
        offset = temporal_crop_offset(len(positions), window, draw)
    return [index(int(p)) for p in positions[offset : offset + length]]


def _spread(num_source_frames: int, spec: ClipSpec) -> list[int]:
    """CogVideoX's frame choice (``finetune/datasets/utils.py``): ``range(0, N, N // F)[:F]`` over the N
    frames from ``start_frame``, i.e. the clip spread over the whole video at the integer stride ``N // F``.
    Fewer than F frames is a ``ClipError`` (the seed repeats the last frame; see docs/datasets.md)."""
    n = num_source_frames - spec.start_frame
    if spec.frame_policy is not None or spec.temporal_crop != "start":
        raise ClipError("frame_spread takes the whole video: no frame_policy or random temporal crop with it")
    if n < spec.num_frames:
        raise ClipError(f"the clip spreads {spec.num_frames} frames over the video, which has {max(n, 0)}")
    step = n // spec.num_frames
    return [spec.start_frame + i * step for i in range(spec.num_frames)]


# --------------------------------------------------------------------------------------------- decoding


class _Overshoot(Exception):
    """The seek landed after the first wanted frame (possible when a demuxer seeks by decode time)."""


class _NoTimestamps(Exception):
    """A frame without a timestamp: frames must be matched by position, decoding from the start."""


class DecodedFrames:
    """What ``read_frames`` returns: RGB frames as stored (not yet rotated) and how they were obtained.

    ``frames`` is (T, H, W, 3) uint8, one per requested index in request order; ``rotation`` the clockwise
    display rotation of the file; ``decoded`` how many frames the decoder produced (seeking makes this
    smaller than the last index; tests and benchmarks use it to see that seeking works).
    """

    def __init__(self, frames: np.ndarray, rotation: int, decoded: int):
        self.frames = frames
        self.rotation = rotation
        self.decoded = decoded


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise av.error.InvalidDataError(0, "no video stream")


def _attempt(path: str, wanted: list[int], fps: float, seek_seconds: float | None) -> DecodedFrames:
    """Decode the wanted (sorted, unique) indices, seeking first to ``seek_seconds`` if given.

    A decoded frame's index is its time on the ``fps`` grid, rounded half up:
    ``floor((pts - stream start) * time_base * fps + 0.5)``. For constant frame rate this is its position.
    For variable frame rate (``fps`` then is the average rate the probe stores), index ``i`` gets the last
    frame whose index is <= i: a frame held on screen longer repeats, frames closer together than 1 / fps
    are skipped. Matching by time rather than position is what lets a seek land anywhere and still know
    which frame it is at. (A manifest fps rounded from the true rate, e.g. 30 for 29.97, shifts the mapping
    by one frame every 1000 frames.)
    """
    with open_input(path) as container:
        stream = _video_stream(container)
        tb = stream.time_base
        origin = stream.start_time or 0
        if seek_seconds is not None:
            # Backward: land on the keyframe at or before the target, then decode forward to it.
            container.seek(origin + int(seek_seconds / tb), stream=stream, backward=True, any_frame=False)
        out: dict[int, np.ndarray] = {}
        rotation: int | None = None
        prev: av.VideoFrame | None = None
        prev_rgb: np.ndarray | None = None
        j = 0  # next wanted index to fill
        decoded = 0
        end_index = 0
        for frame in container.decode(stream):
            decoded += 1
            if rotation is None:
                rotation = rotation_of(frame, stream)
            if frame.pts is None:
                raise _NoTimestamps
            index = math.floor(float((frame.pts - origin) * tb) * fps + 0.5)
            if prev is None and index > wanted[0]:
                if seek_seconds is not None:
                    raise _Overshoot
                index = wanted[0]  # the stream starts a little late: its first frame stands for frame 0
            # Every wanted index before this frame's is shown by the previous frame.
            while j < len(wanted) and wanted[j] < index:
                if prev_rgb is None:
                    prev_rgb = prev.to_ndarray(format="rgb24")
                out[wanted[j]] = prev_rgb
                j += 1
            if j == len(wanted):
                break
            prev, prev_rgb = frame, None
            span = math.floor(float(frame.duration * tb) * fps + 0.5) if frame.duration else 1
            end_index = index + max(1, span)
        else:
            if prev is None and seek_seconds is not None:
                raise _Overshoot  # the seek went past every frame: try from further back
            # End of stream: the last frame stays on screen until its duration ends.
            while j < len(wanted) and prev is not None and wanted[j] < end_index:
                if prev_rgb is None:
                    prev_rgb = prev.to_ndarray(format="rgb24")
                out[wanted[j]] = prev_rgb
                j += 1
            if j < len(wanted):
                raise av.error.InvalidDataError(
                    0, f"the video ends before frame {wanted[j]} (decoded up to index {end_index - 1})"
                )
    return DecodedFrames(np.stack([out[i] for i in wanted]), rotation or 0, decoded)


def _by_position(path: str, wanted: list[int]) -> DecodedFrames:
    """Fallback for streams without timestamps: the i-th decoded frame is frame i."""
    out: dict[int, np.ndarray] = {}
    rotation = 0
    last = wanted[-1]
    wanted_set = set(wanted)
    decoded = 0
    with open_input(path) as container:
        stream = _video_stream(container)
        for position, frame in enumerate(container.decode(stream)):
            decoded += 1
            if position == 0:
                rotation = rotation_of(frame, stream)
            if position in wanted_set:
                out[position] = frame.to_ndarray(format="rgb24")
            if position >= last:
                break
    missing = [i for i in wanted if i not in out]
    if missing:
        raise av.error.InvalidDataError(0, f"the video ends before frame {missing[0]} ({decoded} decoded)")
    return DecodedFrames(np.stack([out[i] for i in wanted]), rotation, decoded)


def read_frames(path: str | os.PathLike, indices: Sequence[int], fps: float) -> DecodedFrames:
    """Decode the given frame indices of a video as RGB, seeking instead of decoding from the start.

    Seeks to the keyframe at or before the first needed frame, decodes forward, and stops after the last
    one; only the needed frames are converted to RGB. If a seek lands after the first needed frame, it
    retries from further back (1 s, 2 s, 4 s ... earlier), and at worst from the start. ``fps`` is the
    manifest's frame rate (the stream's average rate), which defines the index grid (see ``_attempt``).
    Raises ``av.error.FFmpegError``/``OSError`` on failure (``decode_clip`` turns them into ``DecodeError``).
    """
    path = str(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("no frame indices")
    position = {index: k for k, index in enumerate(wanted)}
    order = [position[int(i)] for i in indices]
    if fps <= 0:
        result = _by_position(path, wanted)
    else:
        first_time = wanted[0] / fps
        back = 0.0
        while True:
            target = first_time - back
            try:
                result = _attempt(path, wanted, fps, target if target > 0 else None)
                break
            except _NoTimestamps:
                result = _by_position(path, wanted)
                break
            except _Overshoot:
                back = 1.0 if back == 0 else back * 2
    return DecodedFrames(result.frames[order], result.rotation, result.decoded)


def _read_image(path: str) -> DecodedFrames:
    with open_input(path) as container:
        stream = _video_stream(container)
        for frame in container.decode(stream):
            return DecodedFrames(frame.to_ndarray(format="rgb24")[None], rotation_of(frame, stream), 1)
    raise av.error.InvalidDataError(0, "the image holds no picture")


def _rotate(video: torch.Tensor, clockwise: int) -> torch.Tensor:
    """Turn (C, T, H, W) frames clockwise by 0/90/180/270 degrees."""
    # torch.rot90 with k > 0 turns from the H axis towards the W axis, i.e. counter-clockwise.
    k = (-(clockwise // 90)) % 4
    return torch.rot90(video, k, dims=(2, 3)) if k else video


def _target_size(h: int, w: int, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) to produce; a missing side follows the source's aspect ratio."""
    if height is None and width is None:
        return h, w
    if height is None:
        return max(1, round(h * width / w)), int(width)
    if width is None:
        return int(height), max(1, round(w * height / h))
    return int(height), int(width)


def resize_cover(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (C, T, H, W) keeping the aspect ratio so it covers height x width, then center-crop to it.

    Bilinear with antialiasing (so downscaling does not alias). uint8 input gives uint8 output, rounded.
    """
    _, _, h, w = video.shape
    if (h, w) == (height, width):
        return video
    scale = max(height / h, width / w)
    # max(): rounding must never leave the scaled frame smaller than the target.
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = video.permute(1, 0, 2, 3).float()  # (T, C, H, W): interpolate treats T as the batch
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        if video.dtype == torch.uint8:
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        video = x.permute(1, 0, 2, 3)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top : top + height, left : left + width]


def _crop(video: torch.Tensor, crop: Sequence[int], path: str) -> torch.Tensor:
    x0, x1, y0, y1 = (int(v) for v in crop)
    _, _, h, w = video.shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DecodeError(path, f"crop {list(crop)} (x0, x1, y0, y1) is outside the {w}x{h} frame")
    return video[:, :, y0:y1, x0:x1]


def fixed_draw(row: Mapping[str, Any]) -> tuple[int, int, int]:
    """The (seed, index, epoch) used when a caller gives none: seed 0, epoch 0 and an index hashed from the
    row's path and cut, so each sample keeps one fixed random window (for callers with no epoch)."""
    text = f"{row.get('path')}|{row.get('cut_start')}|{row.get('cut_end')}"
    return 0, int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little"), 0


def decode_clip(
    row: Mapping[str, Any],
    spec: ClipSpec,
    *,
    root: str | os.PathLike | None = None,
    output: Literal["uint8", "float"] = "uint8",
    draw: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Decode one clip of a manifest row as displayed: a (C=3, T, H, W) tensor.

    ``row`` needs ``path``, ``num_frames`` and ``fps``; a relative path is taken from ``root``. Optional row
    columns that change the pixels (the cache keys on them too): ``cut_start``/``cut_end`` (the sample is
    frames [cut_start, cut_end) of the file; ``spec.start_frame`` counts from cut_start), ``crop`` (used
    when ``spec.crop`` is None), ``rotation`` (clockwise degrees; overrides the file's display matrix),
    ``is_image``.

    Steps: choose frame indices (``frame_indices``), seek-decode them (``read_frames``), rotate to the
    displayed orientation, crop (x0, x1, y0, y1 in displayed pixels), resize to cover (height, width)
    keeping the aspect ratio, center-crop. Images give T=1, or spec.num_frames copies when that is > 1.

    ``output="uint8"``: values 0..255; ``"float"``: float32 in [-1, 1]. Any failure raises ``DecodeError``.

    ``draw = (seed, sample index, epoch)`` decides a ``temporal_crop="random"`` window (training passes
    its item's draw, so the window changes per epoch; the cache refuses random crops, see
    ``pipeline.uncacheable``); a caller without one gets ``fixed_draw(row)``: a window that differs per
    sample but not per epoch.
    """
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    raw = Path(str(row["path"]))
    path = str(raw if raw.is_absolute() or root is None else Path(root) / raw)
    is_image = bool(row.get("is_image")) or raw.suffix.lower() in IMAGE_SUFFIXES
    try:
        if is_image:
            decoded = _read_image(path)
            repeat = spec.num_frames if spec.num_frames > 1 else 1
        else:
            fps = float(row.get("fps") or 0.0)
            cut_start = int(row.get("cut_start") or 0)
            cut_end = row.get("cut_end")
            available = (int(cut_end) if cut_end is not None else int(row["num_frames"])) - cut_start
            if spec.temporal_crop == "random" and draw is None:
                draw = fixed_draw(row)
            indices = [cut_start + i for i in frame_indices(available, fps, spec, draw=draw)]
            decoded = read_frames(path, indices, fps)
            repeat = 1
    except (av.error.FFmpegError, ValueError, TypeError, KeyError, OSError) as exc:  # ClipError: ValueError
        # FFmpeg errors: their own message (strerror), without the errno and path PyAV wraps around it.
        message = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DecodeError(path, message.splitlines()[0]) from None

    video = torch.from_numpy(decoded.frames).permute(3, 0, 1, 2)  # (T, H, W, 3) -> (C, T, H, W)
    if output == "float":
        video = video.float()  # resize in float so [-1, 1] output is not quantised to 8 bits first
    rotation = row.get("rotation")
    video = _rotate(video, int(rotation) % 360 if rotation is not None else decoded.rotation)
    crop = spec.crop if spec.crop is not None else row.get("crop")
    if crop is not None:
        video = _crop(video, crop, path)
    height, width = _target_size(video.shape[2], video.shape[3], spec.height, spec.width)
    if spec.resize == "adm":  # DiT's center_crop_arr (data/image_ops.py)
        from frameloom.data.image_ops import adm_center_crop

        video = adm_center_crop(video, height, width)
    else:
        video = resize_cover(video, height, width)
    if spec.hflip and draw_int(0, 1, *(draw or fixed_draw(row)), salt="hflip"):
        video = video.flip(-1)
    if repeat > 1:
        video = video.expand(-1, repeat, -1, -1)
    video = video.contiguous()
    if output == "float":
        return video.div_(127.5).sub_(1.0)
    return video
