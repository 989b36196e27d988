"""Captioned synthetic videos for the quickstart and the tests, and the analytic checker that scores them.

Every clip shows one coloured shape on a black background moving in a straight line, captioned
``"a <color> <shape> moving <direction>"``. Because the attributes are known exactly, a model trained on these
clips can be scored without any learned judge: :func:`score_video` finds the moving object in a generated
video and reads off its dominant colour and the direction its centroid travels, and :func:`score_prompts`
compares those with the prompts.

:func:`split_combos` holds some (color, shape, direction) combinations out of training, so the quickstart
measures whether the model composes attributes it saw separately, rather than whether it memorised clips.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import math
import multiprocessing as mp
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from frameloom.data.manifest import from_rows, write_manifest
from frameloom.errors import FrameloomError
from frameloom.sampling.video_io import read_mp4, write_mp4

# ---------------------------------------------------------------------------------------------- vocabulary

# Fully saturated primaries and secondaries: their hues sit 60 degrees apart, the largest equal spacing six
# colours can have, which is what lets the scorer tell them apart in blurred, noisy generations.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# Unit motion per direction in image coordinates (x to the right, y downwards).
_MOTION: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Object side as a fraction of the frame's shorter side, and the fraction of the free path it travels: the
# whole path, edge to edge, so that a caption's direction fixes where the object starts and ends. (With a
# random 60-100% of the path the quickstart's tiny model reached 81% held-out direction accuracy in 1000
# steps; with the whole path, 100%.) The side is half the frame or more so that the four shapes differ by
# enough pixels to be learned and drawn at the quickstart's 16x16: at 30-45% (5-7 px) its model drew a blob
# read as the same shape for most prompts, trained ones included (40% shape accuracy on training prompts).
SIZE_RANGE: tuple[float, float] = (0.50, 0.65)
TRAVEL_RANGE: tuple[float, float] = (1.0, 1.0)

# Below this displacement over the whole clip, as a fraction of the frame's shorter side, the object counts as
# still. Training clips move at least 1 - 0.65 = 35% of the side.
MIN_MOTION = 0.02

Combo = tuple[str, str, str]  # (color, shape, direction)


class SyntheticError(FrameloomError):
    """Bad arguments for the synthetic set (unknown attribute, impossible size or split)."""


def caption(color: str, shape: str, direction: str) -> str:
    """The caption of a clip, e.g. ``caption("red", "square", "left") == "a red square moving left"``."""
    _check_combo((color, shape, direction))
    return f"a {color} {shape} moving {direction}"


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> Combo:
    """Read ``(color, shape, direction)`` back from a caption or prompt.

    Words are matched case-insensitively anywhere in the text, so "A red square, moving left." works too.
    Raises :class:`SyntheticError` unless exactly one colour, one shape and one direction are named.
    """
    words = set(_WORD.findall(text.lower()))
    found = []
    for kind, vocab in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        hits = [w for w in vocab if w in words]
        if len(hits) != 1:
            what = "no" if not hits else f"{len(hits)} ({', '.join(hits)})"
            raise SyntheticError(
                f"caption {text!r} names {what} {kind}; expected exactly one of {list(vocab)}"
            )
        found.append(hits[0])
    return found[0], found[1], found[2]


def all_combos() -> list[Combo]:
    """Every (color, shape, direction) combination, in vocabulary order."""
    return list(itertools.product(COLORS, SHAPES, DIRECTIONS))


def _check_combo(combo: Sequence[str]) -> None:
    if len(combo) != 3:
        raise SyntheticError(f"a combo is (color, shape, direction), got {combo!r}")
    color, shape, direction = combo
    for kind, value, vocab in (
        ("color", color, COLORS),
        ("shape", shape, SHAPES),
        ("direction", direction, DIRECTIONS),
    ):
        if value not in vocab:
            raise SyntheticError(f"unknown {kind} {value!r}; choose from {list(vocab)}")


def _pair_keys(combo: Combo) -> list[tuple[str, str, str]]:
    """The (color, direction), (shape, direction) and (color, shape) pairs of a combo, tagged by kind."""
    c, s, d = combo
    return [("cd", c, d), ("sd", s, d), ("cs", c, s)]


def split_combos(held_out: int = 32, seed: int = 0) -> tuple[list[Combo], list[Combo]]:
    """Split all combos into ``(train_combos, held_out_combos)``, deterministically for a given ``seed``.

    Guarantees: the two lists are disjoint and together hold every combo; every (color, direction),
    (shape, direction) and (color, shape) pair occurs in at least one training combo. So for a held-out
    prompt such as "a red triangle moving up", training has shown a red thing moving up, a triangle moving
    up and a red triangle, just never all three together.

    The held-out combos are chosen greedily, each time the eligible combo whose direction, colour and shape
    are least represented among those already held out (ties broken by a seeded permutation), so held-out
    prompts spread evenly over directions and colours. Both lists come back in vocabulary order.
    """
    combos = all_combos()
    if not 0 <= held_out < len(combos):
        raise SyntheticError(f"held_out must be in [0, {len(combos) - 1}], got {held_out}")
    tiebreak = np.random.default_rng(seed).permutation(len(combos))
    # How often each pair occurs among the combos still in training; a combo may leave training only if
    # every one of its three pairs is still covered by another training combo.
    pairs = Counter(key for combo in combos for key in _pair_keys(combo))
    held_counts = Counter()
    remaining = set(range(len(combos)))
    held: list[int] = []
    while len(held) < held_out:
        eligible = [i for i in remaining if min(pairs[key] for key in _pair_keys(combos[i])) >= 2]
        if not eligible:
            raise SyntheticError(
                f"cannot hold out {held_out} combos and keep every attribute pair in training "
                f"(managed {len(held)}); ask for fewer"
            )

        def rank(i: int) -> tuple[int, int, int, int]:
            c, s, d = combos[i]
            return held_counts["d", d], held_counts["c", c], held_counts["s", s], int(tiebreak[i])

        best = min(eligible, key=rank)
        c, s, d = combos[best]
        pairs.subtract(_pair_keys(combos[best]))
        held_counts.update([("d", d), ("c", c), ("s", s)])
        remaining.remove(best)
        held.append(best)
    return [combos[i] for i in sorted(remaining)], [combos[i] for i in sorted(held)]


class QuickstartSplit(NamedTuple):
    """The quickstart's prompts, split before any tuning (see :func:`split_quickstart`)."""

    train: list[Combo]  # the combos the training clips show
    val_a: list[Combo]  # validation, type (a): unseen shape for a trained (color, direction) pair
    val_b: list[Combo]  # validation, type (b): a (color, direction) pair no training clip shows
    test_a: list[Combo]  # reported set (a)
    test_b: list[Combo]  # reported set (b)

    def held_out(self, which: str) -> list[Combo]:
        """The prompts of ``"val_a"``, ``"val_b"``, ``"test_a"`` or ``"test_b"``."""
        if which not in ("val_a", "val_b", "test_a", "test_b"):
            raise SyntheticError(f"unknown held-out set {which!r}; choose val_a, val_b, test_a or test_b")
        return getattr(self, which)


def _uncovered(train: Sequence[Combo], held: Iterable[Combo]) -> list[Combo]:
    """Held-out combos whose (color, shape) or (shape, direction) pair no training combo shows."""
    seen = {key for combo in train for key in _pair_keys(combo)}
    return [combo for combo in held if not {_pair_keys(combo)[1], _pair_keys(combo)[2]} <= seen]


def split_quickstart(seed: int = 0, max_tries: int = 10_000) -> QuickstartSplit:
    """Split the 96 combos into training, validation and the two reported held-out sets.

    Two kinds of held-out prompt measure two kinds of generalization:

    - type (a): a combo never trained on whose (color, direction) pair *is* trained, with another shape;
    - type (b): a (color, direction) pair that no training clip shows at all (with any shape).

    Each kind has a validation set, used to tune the recipe, and a reported ("test") set, scored once with
    the recipe frozen; the four sets and the training combos are disjoint and together hold every combo.
    The (color, direction) pairs, 24 in all, are laid out as follows, with colours and directions in a seeded
    order ``c0..c5`` and ``d0..d3``:

    - test (b) holds out the pairs ``(c_i, d_i)``, i = 0..3; validation (b) the pairs ``(c4, d1)``,
      ``(c5, d0)``, ``(c2, d3)``, ``(c3, d2)``; each of these 8 pairs with all 4 shapes (16 prompts per set).
      Each set names all 4 directions and 4 colours; every direction keeps 4 of its 6 colours in training
      and every colour at least 2 of its 4 directions.
    - the 16 remaining pairs are trained. Test (a) takes one shape of each (16 prompts, each shape 4 times),
      validation (a) one further shape of 8 of them (2 per direction; each shape twice); training keeps the
      other 40 combos (2 or 3 shapes per trained pair).

    The shapes of the (a) sets are drawn (seeded) until every held-out combo's (color, shape) and (shape,
    direction) pairs occur in training: the model has seen a red triangle and a triangle moving up, just not
    the combination asked for. Each list comes back in vocabulary order.
    """
    rng = np.random.default_rng(seed)
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    dirs = [DIRECTIONS[i] for i in rng.permutation(len(DIRECTIONS))]
    test_pairs = [(colors[i], dirs[i]) for i in range(4)]
    val_pairs = [(colors[4], dirs[1]), (colors[5], dirs[0]), (colors[2], dirs[3]), (colors[3], dirs[2])]
    trained_pairs = [(c, d) for c in COLORS for d in DIRECTIONS if (c, d) not in test_pairs + val_pairs]
    test_b = [(c, s, d) for c, d in test_pairs for s in SHAPES]
    val_b = [(c, s, d) for c, d in val_pairs for s in SHAPES]
    per_shape_test = len(trained_pairs) // len(SHAPES)  # 4
    for _ in range(max_tries):
        # (a) test: one shape per trained pair, each shape equally often.
        test_shapes = [SHAPES[i] for i in rng.permutation(np.repeat(np.arange(len(SHAPES)), per_shape_test))]
        test_a = [(c, s, d) for (c, d), s in zip(trained_pairs, test_shapes)]
        # (a) validation: 2 trained pairs per direction, each with a shape other than its test shape.
        picks = [i for d in DIRECTIONS for i in rng.permutation(
            [k for k, (_, pd) in enumerate(trained_pairs) if pd == d])[:2]]  # fmt: skip
        val_shapes = [SHAPES[i] for i in rng.permutation(np.repeat(np.arange(len(SHAPES)), 2))]
        val_a = [(trained_pairs[i][0], s, trained_pairs[i][1]) for i, s in zip(picks, val_shapes)]
        if set(val_a) & set(test_a):
            continue
        held = set(test_a) | set(val_a) | set(test_b) | set(val_b)
        train = [combo for combo in all_combos() if combo not in held]
        if not _uncovered(train, held):
            order = {combo: k for k, combo in enumerate(all_combos())}
            return QuickstartSplit(
                *(sorted(x, key=order.__getitem__) for x in (train, val_a, val_b, test_a, test_b))
            )
    raise SyntheticError(f"no quickstart split with every attribute pair in training after {max_tries} draws")


# ----------------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Inside-test for a shape of side ``2 * half`` centred at the origin; ``dx``/``dy`` are pixel offsets."""
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":
        # Apex up at dy = -half, base at dy = +half; the half-width grows linearly from 0 to half.
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) * 0.5)
    raise SyntheticError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")


def render_clip(
    color: str,
    shape: str,
    direction: str,
    *,
    height: int,
    width: int,
    num_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one clip as a ``(num_frames, height, width, 3)`` uint8 array.

    The object's side is 50-65% of the frame's shorter side (``SIZE_RANGE``). It starts near the side opposite ``direction``
    and moves at constant speed across the whole path available to it (``TRAVEL_RANGE``),
    always fully inside the frame; its position across the motion is random. Positions are continuous and
    rasterised at pixel centres (no anti-aliasing), so slow motion still moves the centroid smoothly.
    """
    _check_combo((color, shape, direction))
    if height < 8 or width < 8:
        raise SyntheticError(f"frames must be at least 8x8 pixels, got {height}x{width}")
    if num_frames < 2:
        raise SyntheticError(f"a moving clip needs at least 2 frames, got {num_frames}")
    side = min(height, width) * rng.uniform(*SIZE_RANGE)
    half = side / 2
    mx, my = _MOTION[direction]
    along, across = (width, height) if mx else (height, width)
    free = along - side  # the range of centre positions that keep the object inside, along the motion
    travel = free * rng.uniform(*TRAVEL_RANGE)
    start = half + rng.uniform(0.0, free - travel)  # distance of the start centre from the "from" side
    lateral = rng.uniform(half, across - half)
    steps = start + travel * np.linspace(0.0, 1.0, num_frames)  # (T,) centre along the motion
    position = steps if (mx > 0 or my > 0) else along - steps  # measured from the left/top edge
    if mx:
        cx, cy = position, np.full(num_frames, lateral)
    else:
        cx, cy = np.full(num_frames, lateral), position
    ys = np.arange(height, dtype=np.float64) + 0.5
    xs = np.arange(width, dtype=np.float64) + 0.5
    dx = xs[None, None, :] - cx[:, None, None]  # (T, 1, W)
    dy = ys[None, :, None] - cy[:, None, None]  # (T, H, 1)
    mask = _shape_mask(shape, dx, dy, half)  # (T, H, W)
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    video[mask] = COLORS[color]
    return video


# ---------------------------------------------------------------------------------------------- the dataset


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _ClipSpec(NamedTuple):
    """What every clip of one set shares (picklable, for worker processes)."""

    out: str
    seed: int
    height: int
    width: int
    num_frames: int
    fps: float


def _make_clip(spec: _ClipSpec, index: int, combo: Combo) -> dict[str, Any]:
    """Render and write clip ``index``; its randomness comes only from ``(seed, index)``."""
    color, shape, direction = combo
    rng = np.random.default_rng([spec.seed, index])
    frames = render_clip(
        color, shape, direction, height=spec.height, width=spec.width, num_frames=spec.num_frames, rng=rng
    )
    rel = f"videos/{index:06d}.mp4"
    write_mp4(frames, Path(spec.out) / rel, spec.fps)
    return {"path": rel, "text": caption(*combo), "color": color, "shape": shape, "direction": direction}


def _make_chunk(spec: _ClipSpec, jobs: list[tuple[int, Combo]]) -> list[dict[str, Any]]:
    return [_make_clip(spec, i, combo) for i, combo in jobs]


def write_synthetic_set(
    out_dir: str | os.PathLike,
    *,
    num_clips: int,
    seed: int = 0,
    height: int = 32,
    width: int = 32,
    num_frames: int = 16,
    fps: float = 8,
    combos: Sequence[Combo] | None = None,
    workers: int = 1,
    progress: bool | None = None,
) -> Path:
    """Write a captioned synthetic video set into ``out_dir`` and return ``out_dir``.

    Produces ``videos/NNNNNN.mp4`` (H.264, via :func:`~frameloom.sampling.video_io.write_mp4`), then
    ``captions.csv`` (columns ``path``, relative to ``out_dir``, ``text``, ``color``, ``shape``,
    ``direction``; what the folder dialect of ``prepare`` reads) and ``manifest.parquet`` (the canonical
    manifest with the exact ``num_frames``/``height``/``width``/``fps`` used, plus the attribute columns, so
    callers may skip probing).

    Clip ``i`` shows ``combos[i % len(combos)]`` (default: the training combos of :func:`split_combos`),
    with size, speed and position drawn from a generator seeded by ``(seed, i)``: the output is the same,
    byte for byte, for the same arguments, whatever ``workers`` is. ``workers > 1`` encodes in that many
    processes. ``progress`` shows a progress bar; ``None`` shows one for 200 clips or more.
    """
    if num_clips < 1:
        raise SyntheticError(f"num_clips must be at least 1, got {num_clips}")
    if height % 2 or width % 2:
        # H.264 in yuv420p needs even sizes; refusing here keeps the manifest equal to the files.
        raise SyntheticError(f"height and width must be even for H.264, got {height}x{width}")
    combos = list(split_combos()[0] if combos is None else combos)
    if not combos:
        raise SyntheticError("combos is empty")
    for combo in combos:
        _check_combo(combo)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)

    spec = _ClipSpec(str(out), seed, height, width, num_frames, float(fps))
    jobs = [(i, combos[i % len(combos)]) for i in range(num_clips)]
    show = num_clips >= 200 if progress is None else progress
    rows: list[dict[str, Any]] = []
    with tqdm(total=num_clips, desc="synthetic clips", unit="clip", disable=not show) as bar:
        if workers <= 1:
            for job in jobs:
                rows.append(_make_clip(spec, *job))
                bar.update()
        else:
            # Encoding holds the GIL, so threads do not help; processes do. Chunks amortise the hand-off.
            # "fork" (torch's DataLoader default on Linux) avoids re-importing torch in every worker.
            size = max(1, min(64, math.ceil(num_clips / (4 * workers))))
            chunks = [jobs[k : k + size] for k in range(0, num_clips, size)]
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for chunk_rows in pool.map(_make_chunk, [spec] * len(chunks), chunks):
                    rows.extend(chunk_rows)  # map keeps chunk order, so rows stay in clip order
                    bar.update(len(chunk_rows))

    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["path", "text", "color", "shape", "direction"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(out / "captions.csv", buf.getvalue())

    manifest_rows = [
        {
            "path": r["path"],
            "text": r["text"],
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "fps": float(fps),
            "codec": "h264",
            "duration": num_frames / float(fps),
            "color": r["color"],
            "shape": r["shape"],
            "direction": r["direction"],
        }
        for r in rows
    ]
    write_manifest(from_rows(manifest_rows), out / "manifest.parquet")
    return out


# ------------------------------------------------------------------------------------------------- scoring


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees [0, 360) of RGB vectors (..., 3), from the opponent-colour chroma plane.

    Projecting out the grey axis makes the hue ignore what blur against a black background (scaling) and
    noise or haze (adding grey) do to a colour; only a change of colour itself moves it.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) / 2 * (g - b), r - (g + b) / 2)) % 360.0


_PALETTE_NAMES = list(COLORS)
_PALETTE_HUES = _hue(np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float64))


def _as_cthw_float(video: Any) -> np.ndarray:
    """Any accepted video form -> contiguous ``(3, T, H, W)`` float32 in [0, 1].

    Channel-first because numpy reduces over a trailing axis of length 3 very slowly.
    """
    if isinstance(video, (str, os.PathLike)):
        video = read_mp4(video)
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise SyntheticError(f"video tensor must be shaped (3, T, H, W), got {tuple(video.shape)}")
        v = video.detach().cpu()
        if v.dtype == torch.uint8:
            return v.numpy().astype(np.float32) / np.float32(255.0)
        return ((v.float().numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise SyntheticError(
                f"video array must be uint8 shaped (T, H, W, 3), got {video.dtype} {tuple(video.shape)}"
            )
        # (T, H, W, 3) -> (3, T, H, W)
        return np.ascontiguousarray(np.moveaxis(video, -1, 0)).astype(np.float32) / np.float32(255.0)
    raise SyntheticError(f"cannot score a {type(video).__name__}; pass a tensor, array or video path")


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean over the last two axes, edge-padded: cuts per-pixel noise threefold before thresholding."""
    h, w = x.shape[-2:]
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]  # separable: 4 additions instead of 8
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:])[..., :h, :w] / 9.0


# Shape fitting (see :func:`score_video`, step 5): template sizes relative to the object's rms radius, blur
# widths in pixels, and the supersampling of template pixels per axis.
_SHAPE_HALVES = np.linspace(0.8, 2.0, 13)
_SHAPE_BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)
_SHAPE_SUPERSAMPLE = 4


def _centred_shape_mask(shape: str, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    """:func:`_shape_mask` with the origin at the shape's centroid instead of its box centre.

    Only the triangle differs: its area grows linearly from the apex (``dy = -half``) to the base
    (``dy = +half``), so its centroid lies two thirds of the way down, ``half / 3`` below the box centre.
    """
    return _shape_mask(shape, u, v + half / 3.0 if shape == "triangle" else v, half)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix whose product blurs a length-``n`` axis with a Gaussian of ``sigma`` px (zero
    outside); ``sigma = 0`` gives the identity."""
    if sigma <= 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = int(math.ceil(3 * sigma))
    g = np.exp(-(d**2) / (2 * sigma**2)) * (np.abs(d) <= k)
    return g / np.exp(-(np.arange(-k, k + 1) ** 2) / (2 * sigma**2)).sum()


@functools.lru_cache(maxsize=64)
def _shape_templates(radius: int, rms_radius: float) -> np.ndarray:
    """Every shape's template on the square patch of offsets ``-radius .. radius`` px from the centroid, for
    each size in ``_SHAPE_HALVES * rms_radius`` and each pair of vertical and horizontal Gaussian blurs from
    ``_SHAPE_BLURS``: ``(shapes, sizes, blurs ** 2, n, n)`` with ``n = 2 * radius + 1`` (cached: callers
    quantize ``rms_radius``; read-only).

    A template pixel holds the fraction of it the shape covers (``_SHAPE_SUPERSAMPLE ** 2`` samples), blurred;
    each template is then scaled to unit energy (sum of squares 1).
    """
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    n = len(grid)
    sub = (np.arange(_SHAPE_SUPERSAMPLE) + 0.5) / _SHAPE_SUPERSAMPLE - 0.5
    u = grid[None, :, None, None] + sub[None, None, None, :]  # (1, n, 1, s): x offsets
    v = grid[:, None, None, None] + sub[None, None, :, None]  # (n, 1, s, 1): y offsets
    halves = _SHAPE_HALVES * rms_radius
    cover = np.stack(
        [
            np.stack([_centred_shape_mask(shape, u, v, a).mean(axis=(2, 3)) for a in halves])
            for shape in SHAPES
        ]
    )  # (shapes, sizes, n, n)
    blurs = np.stack([_gaussian_matrix(n, b) for b in _SHAPE_BLURS])  # (b, n, n)
    # Blur each axis on its own (motion smears along one axis): G_y C G_x^T for every (G_y, G_x) pair.
    blurred = blurs[:, None, None, None] @ cover[None, None] @ blurs.transpose(0, 2, 1)[None, :, None, None]
    templates = blurred.transpose(2, 3, 0, 1, 4, 5).reshape(len(SHAPES), len(halves), -1, n, n)
    templates /= np.sqrt((templates * templates).sum(axis=(-2, -1), keepdims=True))  # unit energy
    templates.flags.writeable = False
    return templates


def _canonical_object(
    strength: np.ndarray, frame_weights: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: int
) -> np.ndarray:
    """Average the object over frames with every frame's centroid moved onto the patch centre.

    ``strength`` ``(T, H, W)`` is the per-pixel object strength, ``cx``/``cy`` ``(T,)`` the centroids (pixel
    centres at +0.5); frames count with ``frame_weights`` ``(T,)`` (0 = left out). Each frame is sampled
    bilinearly at ``centroid + offset`` for offsets ``-radius .. radius`` px (zero outside the frame).
    Returns the ``(n, n)`` patch, ``n = 2 * radius + 1``.
    """
    _, h, w = strength.shape
    keep = np.nonzero(frame_weights)[0]
    grid = np.arange(-radius, radius + 1, dtype=np.float64)

    def interpolation(centres: np.ndarray, size: int) -> np.ndarray:
        """``(K, n, size)``: row i holds the linear-interpolation weights of sample point centre + grid[i]."""
        points = centres[:, None] - 0.5 + grid[None, :]  # (K, n) in pixel-index units
        cells = np.arange(size)
        return np.maximum(0.0, 1.0 - np.abs(points[:, :, None] - cells[None, None, :]))  # zero outside

    # Bilinear sampling is separable: patch_k = Wy_k @ strength_k @ Wx_k^T.
    patches = interpolation(cy[keep], h) @ strength[keep] @ interpolation(cx[keep], w).transpose(0, 2, 1)
    weights = frame_weights[keep]
    return np.tensordot(weights, patches, 1) / weights.sum()  # (K,) . (K, n, n) -> (n, n)


def _fit_shape(patch: np.ndarray, rms_radius: float) -> dict[str, float]:
    """Per shape, the least residual of ``patch ~ amplitude * template`` over template size and blur, as
    a fraction of the patch's energy (0 = a perfect fit, 1 = nothing explained). ``patch`` is ``(n, n)``
    around the centroid, odd ``n``; sizes are relative to ``rms_radius``, taken to 1/8 px."""
    templates = _shape_templates(len(patch) // 2, round(rms_radius * 8) / 8)  # (shapes, sizes, blurs, n, n)
    energy = float((patch * patch).sum())
    dot = templates.reshape(len(SHAPES), -1, patch.size) @ patch.reshape(-1)  # (shapes, sizes * blurs)
    explained = np.maximum(dot, 0.0) ** 2  # unit-energy templates: best amplitude = dot, kept >= 0
    residual = 1.0 - explained.max(axis=1) / max(energy, 1e-12)
    return {shape: float(r) for shape, r in zip(SHAPES, residual)}


def score_video(video: Any) -> dict[str, Any]:
    """Find the moving object in a generated video and read off its colour, shape and direction of motion.

    Args:
        video: a ``(3, T, H, W)`` tensor (uint8, or float in [-1, 1]), a ``(T, H, W, 3)`` uint8 array, or the
            path of a video file.

    Returns:
        ``{"color": name | None, "shape": name | None, "direction": name | None, "hue": degrees,
        "shape_fit": {shape: residual}, "dx": px, "dy": px, "foreground": fraction}``: ``dx``/``dy`` are the
        fitted centroid displacement over the whole clip (x right, y down), ``foreground`` the mean foreground
        weight per pixel, ``shape_fit`` each shape's least residual (step 5; 0 = perfect). ``color``/``shape``/
        ``direction`` are ``None`` when no object stands out from the background, or (direction) it moves
        less than ``MIN_MOTION`` of the frame's shorter side.

    Method, built for small, blurry, noisy generations on the synthetic set's black background:

    1. Brightness = max channel after a 3x3 spatial mean. The background level is its median over the
       whole video (the object covers well under half the frame); the object level its 98th percentile.
    2. Foreground weight per pixel ramps from 0 at 30% of the way from background to object level up to 1
       at 60%; a soft ramp instead of a hard cut keeps the estimates continuous in the threshold.
    3. Colour: the weighted mean colour minus the median background colour, classified by the nearest
       palette *hue*. Hue ignores how bright and how saturated the object came out; it separates
       yellow/cyan/magenta from red/green/blue even when blur or chroma bleed pulls them halfway.
    4. Per frame, the foreground-weighted centroid and rms radius; frames holding at least 30% of the
       largest frame's foreground mass show the whole object.
    5. Shape, by analysis by synthesis: the object's strength per pixel (its colour difference from the
       background projected on the object's colour: ~1 inside, ~0 outside, linear in blur and noise) is
       averaged over those frames with each frame's centroid moved onto one point, which gives one sharp,
       low-noise picture of the object. Every shape's template (anti-aliased, centred on its centroid) is
       fitted to it by least squares over 13 sizes and 5 Gaussian blurs, amplitude free; the shape with the
       smallest residual wins. Fitting the blur lets a blurred square still fit a square better than a circle.
    6. Direction: a least-squares line through the per-frame weighted centroids (frames weighted by their
       foreground mass, so a frame where the object fades out counts less); the axis with the larger
       fitted displacement wins and its sign names the direction.
    """
    x = _as_cthw_float(video)  # (3, T, H, W)
    _, t, h, w = x.shape
    smooth = _box3(x)
    value = np.maximum(np.maximum(smooth[0], smooth[1]), smooth[2])  # (T, H, W)
    bg, top = np.percentile(value, [50, 98])
    result: dict[str, Any] = {"color": None, "shape": None, "direction": None, "hue": float("nan"),
                              "shape_fit": {}, "dx": 0.0, "dy": 0.0, "foreground": 0.0}  # fmt: skip
    contrast = top - bg
    if contrast < 0.05:  # nothing stands out: a blank or uniform video
        return result
    lo, hi = bg + 0.3 * contrast, bg + 0.6 * contrast
    weight = np.clip((value - lo) / (hi - lo), 0.0, 1.0)  # (T, H, W)
    mass = float(weight.sum())
    result["foreground"] = mass / weight.size

    # Colour (step 3).
    pixels = x.reshape(3, -1)  # (3, T*H*W)
    bg_rgb = np.median(pixels, axis=1)
    fg_rgb = pixels @ weight.reshape(-1) / mass
    hue = float(_hue(fg_rgb - bg_rgb))
    dist = np.abs((_PALETTE_HUES - hue + 180.0) % 360.0 - 180.0)  # circular distance
    result["hue"] = hue
    result["color"] = _PALETTE_NAMES[int(np.argmin(dist))]

    # Centroids and radii (step 4).
    frame_mass = weight.sum(axis=(1, 2), dtype=np.float64)  # (T,)
    safe = np.maximum(frame_mass, 1e-12)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5  # pixel centres
    cx = weight.sum(axis=1) @ xs / safe  # (T,) centroid x
    cy = weight.sum(axis=2) @ ys / safe  # (T,)
    r2 = (weight.sum(axis=1) * (xs[None] - cx[:, None]) ** 2).sum(1)
    r2 = (r2 + (weight.sum(axis=2) * (ys[None] - cy[:, None]) ** 2).sum(1)) / safe  # (T,) mean squared radius
    whole = frame_mass >= 0.3 * frame_mass.max()

    # Shape (step 5).
    colour = fg_rgb - bg_rgb
    strength = np.tensordot(colour / max(float(colour @ colour), 1e-12), x - bg_rgb[:, None, None, None], 1)
    rms_radius = max(math.sqrt(float(np.median(r2[whole]))), 0.5)
    patch = _canonical_object(
        strength, np.where(whole, frame_mass, 0.0), cx, cy, int(math.ceil(2.2 * rms_radius)) + 1
    )
    fit = _fit_shape(patch, rms_radius)
    result["shape_fit"] = fit
    result["shape"] = min(fit, key=fit.__getitem__)

    # Direction (step 6).
    fw = np.where(frame_mass > 0.05 * frame_mass.max(), frame_mass, 0.0)  # frame weights
    if t < 2 or np.count_nonzero(fw) < 2:
        return result
    times = np.arange(t, dtype=np.float64)
    tc = times - (fw * times).sum() / fw.sum()
    var = (fw * tc**2).sum()
    slope_x = (fw * tc * (cx - (fw * cx).sum() / fw.sum())).sum() / var
    slope_y = (fw * tc * (cy - (fw * cy).sum() / fw.sum())).sum() / var
    dx, dy = slope_x * (t - 1), slope_y * (t - 1)
    result["dx"], result["dy"] = float(dx), float(dy)
    if max(abs(dx), abs(dy)) < MIN_MOTION * min(h, w):
        return result  # a still object has no direction (and rounding noise must not invent one)
    if abs(dx) >= abs(dy):
        result["direction"] = "right" if dx > 0 else "left"
    else:
        result["direction"] = "down" if dy > 0 else "up"
    return result


def _expected(attr: Mapping[str, str] | Sequence[str] | str) -> dict[str, str]:
    """The expected attributes, ``{"color", "direction"[, "shape"]}``, from an attribute mapping (``shape``
    optional), a ``(color, shape, direction)`` tuple, or a caption."""
    if isinstance(attr, str):
        color, shape, direction = parse_caption(attr)
        return {"color": color, "shape": shape, "direction": direction}
    if isinstance(attr, Mapping):
        return {key: attr[key] for key in ("color", "shape", "direction") if key in attr}
    return {"color": attr[0], "shape": attr[1], "direction": attr[2]}


def score_prompts(
    videos: Iterable[Any], attrs: Iterable[Mapping[str, str] | Sequence[str] | str]
) -> dict[str, Any]:
    """Score generated videos against their prompts' attributes.

    Args:
        videos: one video per prompt, in any form :func:`score_video` accepts.
        attrs: per video, a mapping with ``color`` and ``direction`` (and optionally ``shape``) keys, a
            ``(color, shape, direction)`` tuple, or the prompt text itself (parsed with :func:`parse_caption`).

    Returns:
        ``{"color_accuracy", "direction_accuracy", "shape_accuracy", "n", "per_prompt": [...]}`` where each
        ``per_prompt`` entry holds the expected and predicted attributes and the raw scores.
        ``shape_accuracy`` counts only the videos whose expected shape is given (``None`` if none is).
    """
    videos, attrs = list(videos), list(attrs)
    if len(videos) != len(attrs):
        raise SyntheticError(f"got {len(videos)} videos but {len(attrs)} prompt attributes")
    if not videos:
        raise SyntheticError("nothing to score: no videos given")
    per_prompt = []
    for video, attr in zip(videos, attrs):
        want = _expected(attr)
        s = score_video(video)
        entry: dict[str, Any] = {}
        for key in ("color", "shape", "direction"):
            entry[key] = want.get(key)
            entry[f"pred_{key}"] = s[key]
            entry[f"{key}_ok"] = s[key] == want[key] if key in want else None
        entry.update(hue=s["hue"], dx=s["dx"], dy=s["dy"], shape_fit=s["shape_fit"])
        per_prompt.append(entry)
    n = len(per_prompt)
    shaped = [p["shape_ok"] for p in per_prompt if p["shape_ok"] is not None]
    return {
        "color_accuracy": sum(p["color_ok"] for p in per_prompt) / n,
        "direction_accuracy": sum(p["direction_ok"] for p in per_prompt) / n,
        "shape_accuracy": sum(shaped) / len(shaped) if shaped else None,
        "n": n,
        "per_prompt": per_prompt,
    }
