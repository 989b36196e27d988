"""Bucket policies: which (frames, height, width) shape, if any, each manifest row trains at.

A policy turns the manifest's columns into one bucket id per row (``-1``: the row sits out) plus a reason code
for every row left out, all as numpy arrays over the whole manifest: a 10-million-row manifest is a handful
of 10-million-element arrays, never 10 million Python objects. The sampler (data/sampler.py) cuts buckets
into batches; the dataset decodes each sample at its bucket's shape (``BucketPolicy.clip_spec``).

Policies (``data.bucket``), each following what its seed system's code does (SEED_FACTS.md):

- ``opensora`` (Open-Sora 2.0 ``Bucket.get_bucket_id``): ``bucket_config`` {resolution: {frames: (p, batch)}},
  the aspect-ratio size table per resolution, the 0.8 area rule, keep-probabilities drawn per sample and
  epoch, dropping to the next lower resolution on rejection.
- ``opensora_plan`` (Open-Sora-Plan v1.3 ``T2V_dataset.define_frame_index``): resize to area <= max_hxw,
  crop to multiples of hw_stride, or force_resolution; frame resampling, drop_short_ratio, the valid-length
  rule with the sequence-parallel size, the minority-shape filter. Decided once, not per epoch.
- ``fixed`` (CogVideoX): one shape; clips too short for it are left out.
- ``temporal`` (Pyramid Flow): one size, buckets by latent length.

Random decisions use ``uniform``: a counter-based hash of (seed, epoch, row index, draw number), so they are
a pure function of those and cost one vectorized pass, wherever and however often they are recomputed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from frameloom.data.video import ClipSpec
from frameloom.errors import FrameloomError

POLICIES = ("none", "opensora", "opensora_plan", "fixed", "temporal")

# Reason codes of rows left out (Assignment.reason). 0 = in a bucket.
REASONS = (
    "kept",
    "too_small",  # area below every resolution's 0.8 rule / min_hxw, or a side cropped to 0
    "too_short",  # not enough frames for any frame count of the policy
    "aspect",  # h / w outside the accepted range (opensora_plan)
    "rejected",  # every keep-probability draw said no (opensora, this epoch)
    "too_long",  # more than 5x the needed span (opensora_plan)
    "minority",  # its shape has fewer than 4 x global batch samples (opensora_plan)
    "no_image_bucket",  # an image, but the bucket_config has no frame count 1
    "no_fps",  # the frame rule needs the frame rate, and the row has none
)
REASON_CODE = {name: code for code, name in enumerate(REASONS)}

AREA_APPROX = 0.8  # Open-Sora: a resolution needs the video's area >= 0.8 x its pixel count
AR_STEP = 16  # Open-Sora: sizes are multiples of the VAE's spatial compression (AE_SPATIAL_COMPRESSION)
# Open-Sora 2.0 aspect.py ASPECT_RATIO_LD_LIST, "width:height"; each also gets its mirror "height:width".
OPENSORA_RATIOS = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")
PLAN_MIN_FRAMES = 29  # Open-Sora-Plan find_closest_y: fewer frames are never a valid length
PLAN_TOO_LONG = 5.0  # Open-Sora-Plan too_long_factor
PLAN_HW_RATIO = 2.0  # Open-Sora-Plan hw_aspect_thr: h / w in [1/2, 2]
PLAN_MINORITY = 4  # Open-Sora-Plan filter_major_num = 4 * total_batch_size
PLAN_DEFAULT_FPS = 24.0  # Open-Sora-Plan: a record without fps counts as 24 fps


class BucketError(FrameloomError):
    """A bucket configuration that cannot work (unknown policy, bad bucket_config, missing key)."""


# ------------------------------------------------------------------------------------ random numbers

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(z: int) -> int:
    """splitmix64 (Steele, Lea, Flood 2014) on a Python int: a bijective 64-bit mixer."""
    z = (z + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 on a uint64 array (numpy integer arithmetic wraps modulo 2**64, as the mixer needs)."""
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """One 64-bit key per (seed, epoch, stream); streams keep different decisions independent."""
    return _mix_int(_mix_int(_mix_int(int(seed) & _MASK) ^ (int(epoch) & _MASK)) ^ (int(stream) & _MASK))


def uniform(key: int, index: np.ndarray, counter: np.ndarray | int = 0) -> np.ndarray:
    """Draw number ``counter`` of each row ``index`` under ``key``: float64 in [0, 1), a pure function.

    ``u = top53(mix(mix(index ^ key) + counter * golden)) / 2**53``: one splitmix64 pass separates rows, a
    second separates successive draws of one row (Open-Sora's per-sample generator, counter-based).
    """
    idx = np.asarray(index).astype(np.uint64)
    ctr = np.asarray(counter).astype(np.uint64)
    z = _mix(_mix(idx ^ np.uint64(key)) + ctr * np.uint64(0xD1B54A32D192ED03))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# STREAM ids of uniform(): one per kind of decision.
STREAM_OPENSORA = 1
STREAM_PLAN_SHORT = 2
STREAM_SUBSTITUTE = 3


# ------------------------------------------------------------------------------------ manifest columns


@dataclass
class Columns:
    """The manifest columns bucketing reads, as numpy arrays of one length N.

    ``frames`` counts the frames a row may use (``cut_end - cut_start`` when the row is cut, else
    ``num_frames``); ``fps`` is NaN where unknown; images have ``is_image`` True.
    """

    frames: np.ndarray  # (N,) int32
    height: np.ndarray  # (N,) int32
    width: np.ndarray  # (N,) int32
    fps: np.ndarray  # (N,) float64
    is_image: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def area(self) -> np.ndarray:
        return self.height.astype(np.int64) * self.width


IMAGE_SUFFIX_PATTERN = r"(?i)\.(png|jpe?g|webp|bmp)$"
COLUMNS_READ = ("num_frames", "height", "width", "fps", "is_image", "cut_start", "cut_end")


def _numpy(table: pa.Table, name: str, dtype: Any, fill: Any) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, fill)
    return col.to_numpy().astype(dtype, copy=False)


def columns_from_table(table: pa.Table) -> Columns:
    """Columns from a manifest table (only the columns named in COLUMNS_READ, plus ``path`` if needed)."""
    names = set(table.column_names)
    frames = _numpy(table, "num_frames", np.int64, 0)
    if "cut_end" in names:
        end = table.column("cut_end")
        frames = np.where(
            pc.is_null(end).to_numpy(zero_copy_only=False), frames, _numpy(table, "cut_end", np.int64, 0)
        )
    if "cut_start" in names:
        frames = frames - _numpy(table, "cut_start", np.int64, 0)
    fps = _numpy(table, "fps", np.float64, float("nan")) if "fps" in names else np.full(len(frames), np.nan)
    if "is_image" in names:
        is_image = _numpy(table, "is_image", bool, False)
    elif "path" in names:
        is_image = pc.match_substring_regex(table.column("path"), IMAGE_SUFFIX_PATTERN).to_numpy(
            zero_copy_only=False
        )
    else:
        is_image = np.zeros(len(frames), bool)
    return Columns(
        frames=np.maximum(frames, 0).astype(np.int32),
        height=_numpy(table, "height", np.int32, 0),
        width=_numpy(table, "width", np.int32, 0),
        fps=fps,
        is_image=np.asarray(is_image, bool),
    )


def read_columns(path: str | os.PathLike) -> Columns:
    """Read only the columns bucketing needs from a Parquet (or CSV) manifest, validated
    (``manifest.read_manifest``): fast at 10 million rows; a bad cell is one ``ManifestError`` line."""
    from frameloom.data.manifest import read_manifest

    return columns_from_table(read_manifest(path, columns=COLUMNS_READ))


# ------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class BucketTable:
    """The buckets of a policy: parallel arrays over bucket ids 0..K-1."""

    names: tuple[str, ...]
    num_frames: np.ndarray  # (K,) frames of a clip in the bucket
    height: np.ndarray  # (K,)
    width: np.ndarray  # (K,)
    batch_size: np.ndarray  # (K,) samples per batch per process

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, k: int) -> tuple[int, int, int]:
        """(frames, height, width) of bucket k."""
        return int(self.num_frames[k]), int(self.height[k]), int(self.width[k])

    @classmethod
    def from_lists(cls, names, frames, heights, widths, batch) -> BucketTable:
        return cls(
            tuple(names),
            np.asarray(frames, np.int64).reshape(-1),
            np.asarray(heights, np.int64).reshape(-1),
            np.asarray(widths, np.int64).reshape(-1),
            np.asarray(batch, np.int64).reshape(-1),
        )


@dataclass
class Assignment:
    """One epoch's decision for every row: ``bucket`` (N,) int32 (-1: left out), ``reason`` (N,) int8."""

    bucket: np.ndarray
    reason: np.ndarray

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.reason, minlength=len(REASONS))
        return {REASONS[i]: int(c) for i, c in enumerate(counts) if i and c}


# ------------------------------------------------------------------------------------ Open-Sora sizes


def num_pixels(resolution: str) -> int:
    """Open-Sora resolution name -> pixel count: "Npx" = N^2, "Np" = int(N^2 / 9 * 16) (a 16:9 frame N high).

    A "_max" / "_arW:H" suffix is ignored here (see ``resolution_sizes``).
    """
    name = resolution.split("_")[0]
    match = re.fullmatch(r"(\d+)(px|p)", name)
    if not match:
        raise BucketError(f"unknown resolution name {resolution!r} (use e.g. 256px, 768px, 360p, 720p)")
    size = int(match.group(1))
    return size * size if match.group(2) == "px" else int(size * size / 9 * 16)


def ratio_of(name: str) -> float:
    """Aspect-ratio name "W:H" -> h / w (Open-Sora ``get_ratio``)."""
    width, height = map(float, name.split(":"))
    return height / width


def aspect_ratio_sizes(
    total_pixels: int, training: bool = True, step: int = AR_STEP
) -> dict[str, tuple[int, int]]:
    """Open-Sora 2.0 ``get_aspect_ratios_dict``: {"W:H": (height, width)} for one pixel count P.

    For each ratio r = W/H of OPENSORA_RATIOS, in order: ``w = int(sqrt(P * r) // 16) * 16``,
    ``h = int((P / w) // 16) * 16``; when training, one of (h -+ 16, w) / (h, w -+ 16) replaces (h, w) if it
    is closer to P (tried in that order, each against the best so far); a size already in the table is
    skipped (with its mirror). Then every kept "W:H" adds its mirror "H:W" -> (w, h), overwriting an
    existing key in place (so "16:9" ends up as the mirror of "9:16"'s size). Key order matters: ties in
    ``closest_ratio`` go to the first key.
    """
    sizes: dict[str, tuple[int, int]] = {}
    mirrors: dict[str, tuple[int, int]] = {}
    for ratio in OPENSORA_RATIOS:
        rw, rh = map(float, ratio.split(":"))
        width = max(step, int(math.sqrt(total_pixels * (rw / rh)) // step) * step)  # max: tiny P only
        height = max(step, int((total_pixels / width) // step) * step)
        if training:
            diff = abs(height * width - total_pixels)
            for h, w in (
                (height - step, width),
                (height + step, width),
                (height, width - step),
                (height, width + step),
            ):
                if abs(h * w - total_pixels) < diff:
                    height, width = h, w
                    diff = abs(h * w - total_pixels)
        if (height, width) not in sizes.values() or not training:
            sizes[ratio] = (height, width)
            mirrors[":".join(ratio.split(":")[::-1])] = (width, height)
    sizes.update(mirrors)
    return sizes


def resolution_sizes(resolution: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """Open-Sora ``get_resolution_with_aspect_ratio``: (P, sizes); "_max" keeps the largest-area size,
    "_arW:H" keeps that one ratio."""
    parts = resolution.split("_")
    if len(parts) > 2:
        raise BucketError(f"unknown resolution name {resolution!r}")
    pixels = num_pixels(parts[0])
    sizes = aspect_ratio_sizes(pixels)
    if len(parts) == 2:
        setting = parts[1]
        if setting == "max":
            best = max(sizes, key=lambda k: sizes[k][0] * sizes[k][1])
            sizes = {best: sizes[best]}
        elif setting.startswith("ar") and setting[2:] in sizes:
            sizes = {setting[2:]: sizes[setting[2:]]}
        else:
            raise BucketError(
                f"resolution {resolution!r}: setting must be 'max' or 'arW:H' from {list(sizes)}"
            )
    return pixels, sizes


def closest_ratio(aspect: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """Index of the ratio nearest to each h / w, the first one on ties (as Python's ``min`` over dict keys).

    The nearest of sorted values is one of the two around ``searchsorted``'s insertion point, so this is
    O(N log K) instead of K passes over the rows.
    """
    values = np.asarray(ratios, np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    pos = np.searchsorted(ordered, aspect)
    lo = np.clip(pos - 1, 0, len(values) - 1)
    hi = np.clip(pos, 0, len(values) - 1)
    d_lo = np.abs(aspect - ordered[lo])
    d_hi = np.abs(aspect - ordered[hi])
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (order[hi] < order[lo]))
    return order[np.where(take_hi, hi, lo)]


def opensora_stride(fps: np.ndarray | float, fps_max: float | None) -> np.ndarray:
    """Open-Sora ``map_target_fps``: every ``ceil(fps / fps_max)``-th frame when fps >= fps_max, else 1, also
    for unknown fps (the 1e-9 as in ``video.opensora_stride``, so 48 / 24 stays 2)."""
    fps = np.asarray(fps, np.float64)
    if fps_max is None:
        return np.ones(fps.shape, np.int64)
    with np.errstate(invalid="ignore"):
        high = fps >= fps_max  # NaN compares False
    ratio = np.where(high, fps, 1.0) / fps_max
    return np.where(high, np.maximum(1, np.ceil(ratio - 1e-9)), 1).astype(np.int64)


def spec_stride(cols: Columns, frame_stride: float | None, target_fps: float | None) -> np.ndarray:
    """Source frames per clip frame under ClipSpec's ``frame_stride`` / ``target_fps`` rule (NaN where the
    rule needs an unknown fps; 1 without a rule)."""
    if frame_stride is not None:
        return np.full(len(cols), float(frame_stride))
    if target_fps is not None:
        known = np.isfinite(cols.fps) & (cols.fps > 0)
        return np.where(known, cols.fps / target_fps, np.nan)
    return np.ones(len(cols))


# ------------------------------------------------------------------------------------ frame rules


def usable_frames(frames: np.ndarray, stride: np.ndarray | float) -> np.ndarray:
    """How many clip frames a row gives at ``stride`` (ClipSpec rule ``floor(i * stride + 1e-6) < frames``):
    ``ceil((frames - 1e-6) / stride)``; 0 for a non-finite stride."""
    stride = np.asarray(stride, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.ceil((np.asarray(frames, np.float64) - 1e-6) / stride)
    return np.where(np.isfinite(n) & (n > 0), n, 0).astype(np.int64)


def plan_valid_frames(n: np.ndarray, temporal: int = 4, sp_size: int = 1) -> np.ndarray:
    """Open-Sora-Plan ``find_closest_y`` (called with model_ds_t = sp_size): the largest y <= n with
    ``(y - 1) % temporal == 0`` and latent length ``(y - 1) // temporal + 1`` divisible by sp_size; -1 when
    there is no such y >= 29.

    E.g. temporal 4, sp 1: 29..32 -> 29, 35 -> 33; sp 8: 61..92 -> 61 (latent 16), 40 -> 29 (latent 8).
    """
    n = np.asarray(n, np.int64)
    latent = (n - 1) // temporal + 1  # latent length of the largest 4k+1 <= n
    latent = latent // sp_size * sp_size
    y = (latent - 1) * temporal + 1
    return np.where((latent >= 1) & (y >= PLAN_MIN_FRAMES), y, -1)


# ------------------------------------------------------------------------------------ policies


class BucketPolicy:
    """A policy bound to one manifest's columns. ``assign(epoch)`` -> Assignment; ``table`` lists buckets."""

    name = "base"
    per_epoch = False  # True when assignments change from epoch to epoch (random keep-probabilities)

    def __init__(self, cols: Columns, seed: int):
        self.cols = cols
        self.seed = int(seed)
        self.table: BucketTable

    def assign(self, epoch: int) -> Assignment:
        raise NotImplementedError

    def stride_of(self, fps: float) -> float | None:
        """Source frames per clip frame for a row at ``fps``; None: the base ClipSpec's own rule."""
        return None

    def reachable(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, bucket) pair some epoch can assign, as two (P,) arrays sorted by row then bucket.

        What the latent cache must hold to serve every epoch: a static policy assigns each row one bucket
        (or none) for the whole run, so that is its only pair.
        """
        bucket = self.assign(0).bucket
        rows = np.flatnonzero(bucket >= 0)
        return rows.astype(np.int64), bucket[rows].astype(np.int64)

    def clip_spec(self, base: ClipSpec, fps: float | None, bucket: int) -> ClipSpec:
        """The ClipSpec that decodes a row of frame rate ``fps`` at bucket ``bucket``'s shape."""
        frames, height, width = self.table.shape(bucket)
        # The bucket fixes the length: no frame policy may shorten it (it would break the batch's shape). The
        # speed factor keeps dividing by the run's num_frames (Open-Sora-Plan's args.num_frames).
        changes: dict[str, Any] = {
            "num_frames": frames,
            "height": height,
            "width": width,
            "frame_policy": None,
        }
        if getattr(base, "speed_factor", 1.0) != 1.0:
            changes["speed_frames"] = base.speed_frames or base.num_frames
        stride = self.stride_of(float("nan") if fps is None else float(fps))
        if stride is not None:
            changes.update(frame_stride=stride, target_fps=None, fps_max=None)
        known = {f.name for f in fields(base)}
        return replace(base, **{k: v for k, v in changes.items() if k in known})

    def describe(self) -> str:
        return f"{self.name}: {len(self.table)} bucket(s)"


class OpenSoraPolicy(BucketPolicy):
    """Open-Sora 2.0's ``Bucket.get_bucket_id``, vectorized over rows (SEED_FACTS.md, "Open-Sora 2.0").

    Per row and epoch: T = usable frames (``frames // ceil(fps / fps_max)``; images T = 1). Resolutions are
    visited from most to fewest pixels; one is skipped if ``h * w < 0.8 * P``. An image (T == 1) takes frame
    count 1 with probability p (if listed). A video takes the largest listed frame count t <= T (t != 1):
    with a pair (p, q) it first moves on to the next smaller t with probability q; it is accepted with
    probability p, otherwise it drops to the next lower resolution. The aspect bucket is the ratio closest
    to h / w. Draws: ``uniform(key(seed, epoch), row, k)`` for the row's k-th draw, where Open-Sora seeds
    numpy with seed + epoch + index (so a row's draws at epoch e+1 repeat the next row's at epoch e; the
    hash does not have that correlation).
    """

    name = "opensora"
    per_epoch = True

    def __init__(
        self,
        cols: Columns,
        seed: int,
        bucket_config: Mapping[str, Any],
        fps_max: float | None,
        frame_stride: float | None = None,
        target_fps: float | None = None,
    ):
        super().__init__(cols, seed)
        if not bucket_config:
            raise BucketError(
                "data.bucket=opensora needs data.bucket_config {resolution: {frames: [p, batch]}}"
            )
        self.fps_max, self.frame_stride, self.target_fps = fps_max, frame_stride, target_fps
        parsed = []
        for res, frames in bucket_config.items():
            pixels, sizes = resolution_sizes(str(res))
            if not isinstance(frames, Mapping) or not frames:
                raise BucketError(f"data.bucket_config[{res!r}] must map frame counts to [p, batch_size]")
            entries = []
            for t, value in frames.items():
                entries.append((self._frames(res, t), *self._entry(res, t, value)))
            entries.sort(key=lambda e: e[0], reverse=True)  # Open-Sora: frame counts from most to fewest
            parsed.append((str(res), pixels, sizes, entries))
        parsed.sort(key=lambda r: r[1], reverse=True)  # stable: equal pixel counts keep config order
        self.resolutions = parsed
        names, tf, th, tw, tb = [], [], [], [], []
        self.base: list[dict[int, int]] = []  # resolution index -> {frames: first bucket id}
        for res, _, sizes, entries in parsed:
            first = {}
            for t, _p, _q, batch in entries:
                first[t] = len(names)
                for ar, (h, w) in sizes.items():
                    names.append(f"{res}/{t}/{ar}")
                    tf.append(t)
                    th.append(h)
                    tw.append(w)
                    tb.append(batch)
            self.base.append(first)
        self.ratios = [[ratio_of(ar) for ar in sizes] for _, _, sizes, _ in parsed]
        self.table = BucketTable.from_lists(names, tf, th, tw, tb)

    @staticmethod
    def _frames(res: Any, t: Any) -> int:
        try:
            t = int(t)
        except (TypeError, ValueError):
            raise BucketError(f"data.bucket_config[{res!r}]: frame count {t!r} is not an integer") from None
        if t < 1:
            raise BucketError(f"data.bucket_config[{res!r}]: frame count {t} must be >= 1")
        return t

    @staticmethod
    def _entry(res: Any, t: Any, value: Any) -> tuple[float, float | None, int]:
        """[p, batch] or [[p, q], batch] -> (p, q or None, batch)."""
        where = f"data.bucket_config[{res!r}][{t!r}]"
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise BucketError(f"{where} must be [keep probability, batch size], got {value!r}")
        prob, batch = value
        q = None
        if isinstance(prob, (list, tuple)):
            if len(prob) != 2:
                raise BucketError(f"{where}: the probability pair must be [p, q], got {prob!r}")
            prob, q = prob
            if int(t) == 1:
                raise BucketError(f"{where}: frame count 1 (images) takes a single probability, not [p, q]")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise BucketError(f"{where}: batch size must be an integer >= 1, got {batch!r}")
        try:
            prob = float(prob)
            q = None if q is None else float(q)
        except (TypeError, ValueError):
            raise BucketError(f"{where}: probabilities must be numbers, got {value!r}") from None
        return prob, q, batch

    def usable(self) -> np.ndarray:
        """T per row: ``frames // ceil(fps / fps_max)`` (Open-Sora), or the clip frames the ClipSpec's
        frame_stride / target_fps rule gives when fps_max is not set; 1 for images."""
        c = self.cols
        if self.fps_max is not None or (self.frame_stride is None and self.target_fps is None):
            n = c.frames // opensora_stride(c.fps, self.fps_max)
        else:
            n = usable_frames(c.frames, spec_stride(c, self.frame_stride, self.target_fps))
        return np.where(c.is_image, 1, n)

    def assign(self, epoch: int) -> Assignment:
        c = self.cols
        n = len(c)
        key = stream_key(self.seed, epoch, STREAM_OPENSORA)
        T = self.usable()
        area = c.area
        bucket = np.full(n, -1, np.int32)
        counter = np.zeros(n, np.uint16)  # draws taken so far per row
        seen_area = np.zeros(n, bool)
        seen_frames = np.zeros(n, bool)

        def draw(rows: np.ndarray) -> np.ndarray:
            u = uniform(key, rows, counter[rows])
            counter[rows] += 1
            return u

        def accept(rows: np.ndarray, r: int, t: int) -> None:
            aspect = c.height[rows] / c.width[rows]  # (n,) float64 h / w
            bucket[rows] = self.base[r][t] + closest_ratio(aspect, self.ratios[r])

        pending = np.flatnonzero(c.width > 0)  # rows without a bucket yet, ascending
        for r, (_res, pixels, _sizes, entries) in enumerate(self.resolutions):
            if pending.size == 0:
                break
            # 1. The 0.8 area rule.
            act = pending[area[pending] >= pixels * AREA_APPROX]
            seen_area[act] = True
            Ta = T[act]
            # 2. Images: frame count 1 with probability p (Open-Sora draws even when p = 1).
            image_entry = [e for e in entries if e[0] == 1]
            images = act[Ta == 1]
            if images.size and image_entry:
                seen_frames[images] = True
                u = draw(images)
                accept(images[u < image_entry[0][1]], r, 1)
            # 3. Videos: the frame counts from the largest down. A row first meets the largest count <= T
            #    (found by searchsorted, so each row is touched once per count it visits, not once per count).
            videos = [e for e in entries if e[0] != 1]
            vids = act[Ta != 1]
            if videos and vids.size:
                ascending = np.array([e[0] for e in videos[::-1]])
                first = len(videos) - np.searchsorted(ascending, T[vids], side="right")  # index into `videos`
                order = np.argsort(first.astype(np.int16), kind="stable")  # radix sort
                starts = np.searchsorted(first[order], np.arange(len(videos) + 1))
                movers = vids[:0]
                for j, (t, p, q, _batch) in enumerate(videos):
                    eligible = np.concatenate([vids[order[starts[j] : starts[j + 1]]], movers])
                    if eligible.size == 0:
                        continue
                    seen_frames[eligible] = True
                    if q is None:
                        deciders, movers = eligible, eligible[:0]
                    elif q >= 1:
                        deciders, movers = eligible[:0], eligible
                    else:
                        move = draw(eligible) <= q
                        deciders, movers = eligible[~move], eligible[move]
                    if deciders.size:
                        keep = deciders if p >= 1 else deciders[draw(deciders) <= p]
                        accept(keep, r, t)  # the rest of `deciders` drops to the next resolution
            pending = pending[bucket[pending] < 0]
        reason = np.zeros(n, np.int8)
        out = bucket < 0
        reason[out & c.is_image & ~seen_frames] = REASON_CODE["no_image_bucket"]
        reason[out & ~c.is_image & ~seen_frames] = REASON_CODE["too_short"]
        reason[out & seen_frames] = REASON_CODE["rejected"]
        reason[out & ~seen_area] = REASON_CODE["too_small"]
        return Assignment(bucket, reason)

    def reachable(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, bucket) pair ``assign`` can give in some epoch (see ``BucketPolicy.reachable``).

        ``assign``'s walk with every random decision taken both ways where both are possible: a keep draw
        (``u <= p``) can accept when p > 0 and reject when p < 1 (the row then drops to the next lower
        resolution); a move draw (``u <= q``) can move on to the next smaller frame count when q > 0 and
        stay when q < 1. (A probability of exactly 0 is read as never: its draw succeeds only for u == 0,
        one chance in 2**53.) A row with p = q = 1 everywhere reaches one bucket; ``(p, q)`` pairs and
        p < 1 give it several.
        """
        c = self.cols
        n = len(c)
        T = self.usable()
        area = c.area
        out_rows: list[np.ndarray] = []
        out_buckets: list[np.ndarray] = []

        def add(mask: np.ndarray, r: int, t: int) -> None:
            rows = np.flatnonzero(mask)
            if rows.size:
                aspect = c.height[rows] / c.width[rows]  # (n,) float64 h / w
                out_rows.append(rows)
                out_buckets.append(self.base[r][t] + closest_ratio(aspect, self.ratios[r]))

        arrive = c.width > 0  # rows that can still be without a bucket when resolution r is visited
        for r, (_res, pixels, _sizes, entries) in enumerate(self.resolutions):
            act = arrive & (area >= pixels * AREA_APPROX)
            moves_on = arrive & ~act  # below the 0.8 area rule: straight to the next resolution
            # 1. Images (T == 1): frame count 1, accepted when u < p.
            image = act & (T == 1)
            image_entry = [e for e in entries if e[0] == 1]
            if image_entry:
                p = image_entry[0][1]
                if p > 0:
                    add(image, r, 1)
                if p < 1:
                    moves_on |= image
            else:
                moves_on |= image
            # 2. Videos: enter at the largest count <= T, then accept / reject / move on, entry by entry.
            video = act & (T != 1)
            videos = [e for e in entries if e[0] != 1]
            if videos:
                ascending = np.array([e[0] for e in videos[::-1]])
                first = len(videos) - np.searchsorted(ascending, T, side="right")  # (N,) index into `videos`
                here = np.zeros(n, bool)  # rows that can arrive at entry j
                for j, (t, p, q, _batch) in enumerate(videos):
                    here |= video & (first == j)
                    decides = q is None or q < 1
                    if decides and p > 0:
                        add(here, r, t)
                    if decides and p < 1:
                        moves_on |= here  # rejected: the next lower resolution
                    if q is None or q <= 0:
                        here = np.zeros(n, bool)  # nobody moves on to the next frame count
                moves_on |= here | (video & (first == len(videos)))  # past the last count, or no count <= T
            else:
                moves_on |= video
            arrive = moves_on
        if not out_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = np.concatenate(out_rows).astype(np.int64)
        buckets = np.concatenate(out_buckets).astype(np.int64)
        order = np.lexsort((buckets, rows))
        return rows[order], buckets[order]


class OpenSoraPlanPolicy(BucketPolicy):
    """Open-Sora-Plan v1.3's ``define_frame_index`` (SEED_FACTS.md, "Open-Sora-Plan v1.3"), decided once.

    Size, without force_resolution: if ``h * w > max_hxw``, scale by ``sqrt(max_hxw / (h * w))`` and truncate
    each side (``maxhwresize``); then crop each side down to a multiple of hw_stride (``get_params``). Left
    out: a side of 0, an area < min_hxw (default max_hxw / 4), h / w outside [1/2, 2]. With force_resolution:
    the size is max_height x max_width, kept when ``aspect / 2 <= h / w <= 2 * aspect`` for the target's
    aspect. Videos: stride ``fps / train_fps`` (1 within 0.1 fps; ``data.target_fps``, none: 1);
    more than 5x the needed source span is too long; n = ceil(frames / stride) frames; fewer than num_frames
    are dropped with probability drop_short_ratio; n is cut to num_frames and then to ``plan_valid_frames``.
    Shapes "T x H x W" with fewer than 4 x batch x grad_accum x megabatch samples are dropped (the seed
    applies this filter with or without --group_data).
    """

    name = "opensora_plan"

    def __init__(self, cols: Columns, seed: int, cfg: Any):
        super().__init__(cols, seed)
        d = cfg.data
        self.num_frames = d.num_frames
        self.train_fps = d.target_fps
        self.force = d.force_resolution
        self.speed_factor = float(getattr(d, "speed_factor", 1.0) or 1.0)
        self.temporal = d.temporal_compression or 4
        self.sp_size = max(1, cfg.parallel.sp_size)
        self.drop_short_ratio = d.drop_short_ratio
        self.hw_stride = d.hw_stride
        if self.force:
            self.max_height = d.max_height or d.height
            self.max_width = d.max_width or d.width
        else:
            if not d.max_hxw:
                raise BucketError(
                    "data.bucket=opensora_plan needs data.max_hxw (or data.force_resolution=true)"
                )
            self.max_hxw = int(d.max_hxw)
            self.min_hxw = int(d.min_hxw) if d.min_hxw is not None else self.max_hxw // 4
        self.min_group = PLAN_MINORITY * cfg.train.batch_size * cfg.train.grad_accum * max(1, d.megabatch)
        self.batch_size = cfg.train.batch_size
        self._assignment = self._compute()

    def sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_h, sample_w, reason) per row from the resolution rules."""
        c = self.cols
        h = c.height.astype(np.int64)
        w = c.width.astype(np.int64)
        reason = np.zeros(len(c), np.int8)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.force:
                aspect = self.max_height / self.max_width
                hw = h / w
                ok = (hw <= PLAN_HW_RATIO * aspect) & (hw >= 1 / PLAN_HW_RATIO * aspect)
                reason[~ok] = REASON_CODE["aspect"]
                sh = np.full(len(c), self.max_height, np.int64)
                sw = np.full(len(c), self.max_width, np.int64)
            else:
                big = h * w > self.max_hxw
                scale = np.sqrt(self.max_hxw / np.where(big, h * w, 1))
                th = np.where(big, (h * scale).astype(np.int64), h)
                tw = np.where(big, (w * scale).astype(np.int64), w)
                sh = th // self.hw_stride * self.hw_stride
                sw = tw // self.hw_stride * self.hw_stride
                hw = sh / sw
                aspect_bad = ~((hw <= PLAN_HW_RATIO) & (hw >= 1 / PLAN_HW_RATIO))
                reason[aspect_bad] = REASON_CODE["aspect"]
                reason[sh * sw < self.min_hxw] = REASON_CODE["too_small"]
                reason[(sh <= 0) | (sw <= 0)] = REASON_CODE["too_small"]
        return sh, sw, reason

    def stride_of(self, fps: float) -> float:
        """``fps / train_fps``, 1 within 0.1 fps of it or without a training fps; an unknown rate counts as
        24 fps, as in ``frame_counts`` (Open-Sora-Plan's ``i.get('fps', 24)``), so the decoder takes the frames
        the policy counted."""
        if self.train_fps is None:
            return 1.0
        if not math.isfinite(fps) or fps <= 0:
            fps = PLAN_DEFAULT_FPS
        if abs(fps - self.train_fps) < 0.1:
            return 1.0
        return fps / self.train_fps

    def frame_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(clip frames, reason) per row from the frame rules (images: 1)."""
        c = self.cols
        n_rows = len(c)
        fps = np.where(np.isfinite(c.fps) & (c.fps > 0), c.fps, PLAN_DEFAULT_FPS)  # i.get('fps', 24)
        reason = np.zeros(n_rows, np.int8)
        # 1. Too long: more than 5x the source span the clip needs.
        train_fps = self.train_fps if self.train_fps is not None else fps
        need = self.num_frames * fps / train_fps * self.speed_factor
        reason[c.frames > PLAN_TOO_LONG * need] = REASON_CODE["too_long"]
        # 2. Frames after resampling: len(arange(0, frames, stride)).
        if self.train_fps is None:
            stride = np.ones(n_rows)
        else:
            stride = np.where(np.abs(fps - self.train_fps) < 0.1, 1.0, fps / self.train_fps)
        n = np.ceil(c.frames / stride).astype(np.int64)
        if self.speed_factor > 1:  # Open-Sora-Plan get_actual_frame; its define_frame_index forgets this
            factor = np.minimum(self.speed_factor, n / self.num_frames)
            n = np.where(factor > 1, (n / np.where(factor > 1, factor, 1)).astype(np.int64), n)
        # 3. Short clips: dropped with probability drop_short_ratio (one static draw per row).
        short = n < self.num_frames
        u = uniform(stream_key(self.seed, 0, STREAM_PLAN_SHORT), np.arange(n_rows))
        reason[short & (u < self.drop_short_ratio) & (reason == 0)] = REASON_CODE["too_short"]
        # 4. Temporal crop to num_frames, then the valid-length rule.
        y = plan_valid_frames(np.minimum(n, self.num_frames), self.temporal, self.sp_size)
        reason[(y < 0) & (reason == 0)] = REASON_CODE["too_short"]
        return np.where(c.is_image, 1, y), np.where(c.is_image, 0, reason).astype(np.int8)

    def _compute(self) -> Assignment:
        c = self.cols
        sh, sw, size_reason = self.sizes()
        frames, frame_reason = self.frame_counts()
        reason = np.where(size_reason > 0, size_reason, frame_reason).astype(np.int8)
        ok = reason == 0
        # Shape key T x H x W, then the table of the shapes that occur.
        key = np.stack([frames, sh, sw], axis=1)[ok]
        shapes, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        minority = counts < self.min_group
        rows = np.flatnonzero(ok)
        reason[rows[minority[inverse]]] = REASON_CODE["minority"]
        keep_shapes = np.flatnonzero(~minority)
        new_id = np.full(len(shapes), -1, np.int64)
        new_id[keep_shapes] = np.arange(len(keep_shapes))
        bucket = np.full(len(c), -1, np.int32)
        bucket[rows] = new_id[inverse]
        shapes = shapes[keep_shapes]
        self.table = BucketTable.from_lists(
            [f"{t}x{h}x{w}" for t, h, w in shapes.tolist()],
            shapes[:, 0],
            shapes[:, 1],
            shapes[:, 2],
            np.full(len(shapes), self.batch_size),
        )
        return Assignment(bucket, reason)

    def assign(self, epoch: int) -> Assignment:
        return self._assignment


class FixedPolicy(BucketPolicy):
    """CogVideoX: every clip at num_frames x height x width (crop-and-resize keeping the aspect ratio, unlike
    the seed's plain resize); videos with fewer usable frames (at the ClipSpec stride) are left out. Without
    a stride rule (``frame_stride``/``target_fps``/``fps_max``) the clip is spread over the whole video as the
    seed does it, ``range(0, N, N // F)[:F]`` (``ClipSpec.frame_spread``)."""

    name = "fixed"
    spread = True

    def clip_spec(self, base: ClipSpec, fps: float | None, bucket: int) -> ClipSpec:
        spec = super().clip_spec(base, fps, bucket)
        no_rule = spec.frame_stride is None and spec.target_fps is None and spec.fps_max is None
        if self.spread and no_rule and spec.temporal_crop == "start":
            spec = replace(spec, frame_spread=True)
        return spec

    def __init__(self, cols: Columns, seed: int, cfg: Any):
        super().__init__(cols, seed)
        d = cfg.data
        self.frame_stride, self.target_fps, self.fps_max = d.frame_stride, d.target_fps, d.fps_max
        self.table = BucketTable.from_lists(
            [f"{d.num_frames}x{d.height}x{d.width}"],
            [d.num_frames],
            [d.height],
            [d.width],
            [cfg.train.batch_size],
        )
        self._assignment = self._compute()

    def clip_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(usable clip frames per row at the ClipSpec stride, reason): images count as having any number."""
        c = self.cols
        reason = np.zeros(len(c), np.int8)
        if self.fps_max is not None:
            stride = opensora_stride(c.fps, self.fps_max).astype(np.float64)
        else:
            stride = spec_stride(c, self.frame_stride, self.target_fps)
        reason[np.isnan(stride) & ~c.is_image] = REASON_CODE["no_fps"]
        n = usable_frames(c.frames, stride)
        return np.where(c.is_image, np.iinfo(np.int64).max, n), reason

    def _compute(self) -> Assignment:
        c = self.cols
        n, reason = self.clip_frames()
        reason[(reason == 0) & (n < self.table.num_frames[0])] = REASON_CODE["too_short"]
        reason[(reason == 0) & (c.area <= 0)] = REASON_CODE["too_small"]
        return Assignment(np.where(reason == 0, 0, -1).astype(np.int32), reason)

    def assign(self, epoch: int) -> Assignment:
        return self._assignment


class TemporalPolicy(FixedPolicy):
    """Pyramid Flow: one size, buckets by latent length L (video frames ``(L - 1) * c + 1``, c = 8).

    ``L = min((n - 1) // c + 1, L_max)`` for n usable frames, ``L_max = (num_frames - 1) // c + 1``, rounded
    down to a multiple of latent_multiple (video_sync_group); L = 0 is too short. Images: L = 1 when
    latent_multiple is 1.
    """

    name = "temporal"
    spread = False  # Pyramid Flow takes the first frames: [0, num_frames)

    def __init__(self, cols: Columns, seed: int, cfg: Any):
        d = cfg.data
        self.c = d.temporal_compression or 8
        self.multiple = max(1, d.latent_multiple)
        l_max = (d.num_frames - 1) // self.c + 1
        self.latents = list(range(self.multiple, l_max + 1, self.multiple))
        if not self.latents:
            raise BucketError(
                f"data.num_frames={d.num_frames} gives {l_max} latent frames, fewer than "
                f"data.latent_multiple={self.multiple}"
            )
        self.l_max = l_max
        BucketPolicy.__init__(self, cols, seed)
        self.frame_stride, self.target_fps, self.fps_max = d.frame_stride, d.target_fps, d.fps_max
        frames = [(L - 1) * self.c + 1 for L in self.latents]
        self.table = BucketTable.from_lists(
            [f"{t}x{d.height}x{d.width}" for t in frames],
            frames,
            [d.height] * len(frames),
            [d.width] * len(frames),
            [cfg.train.batch_size] * len(frames),
        )
        self._assignment = self._compute()

    def _compute(self) -> Assignment:
        c = self.cols
        n, reason = self.clip_frames()
        n = np.where(c.is_image, 1, n)
        latent = np.where(n > 0, (n - 1) // self.c + 1, 0)
        latent = np.minimum(latent, self.l_max) // self.multiple * self.multiple
        reason[(reason == 0) & (latent == 0)] = REASON_CODE["too_short"]
        reason[(reason == 0) & (c.area <= 0)] = REASON_CODE["too_small"]
        bucket = np.where(reason == 0, latent // self.multiple - 1, -1).astype(np.int32)
        return Assignment(bucket, reason)


def build_policy(cfg: Any, cols: Columns) -> BucketPolicy | None:
    """The policy ``cfg.data.bucket`` names, bound to ``cols``; None for ``none``."""
    name = cfg.data.bucket
    if name not in POLICIES:
        raise BucketError(f"data.bucket must be one of {', '.join(POLICIES)}, not {name!r}")
    if name == "none":
        return None
    if name == "opensora":
        d = cfg.data
        return OpenSoraPolicy(cols, cfg.seed, d.bucket_config, d.fps_max, d.frame_stride, d.target_fps)
    if name == "opensora_plan":
        return OpenSoraPlanPolicy(cols, cfg.seed, cfg)
    if name == "fixed":
        return FixedPolicy(cols, cfg.seed, cfg)
    return TemporalPolicy(cols, cfg.seed, cfg)
