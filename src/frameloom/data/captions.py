"""Caption rules of the seed systems, as small pure functions.

- Open-Sora 2.0 appends the row's motion score (``"{text} 3 motion score."``; with the frame rate
  ``"{text} 24 FPS, 3 motion score."``), rounded half up from its VMAF motion score.
- Open-Sora appends the clip's frame rate: ``"{text} {fps} FPS."``, with ``fps = source_fps // stride``
  (its dataset reports ``video_fps // frame_interval``, so a 29.97 fps video at stride 1 says "29 FPS").
- Open-Sora-Plan appends an aesthetic phrase when the row's aesthetic score is <= 4.25 (low) or >= 5.75
  (high): one of ten phrases, put before or after the caption at random (``add_aesthetic_notice_video`` /
  ``_image`` in its ``opensora/dataset/transform.py``). The phrases below are that file's lists.

Where frameloom differs, on purpose (docs/datasets.md):

- The seed draws the phrase and its side from Python's global ``random``; here the draw is a pure function
  of (seed, sample index, epoch) (mode ``random``), or fixed (mode ``fixed``: the first phrase, after the
  caption), which gives one text per sample so the text-embedding cache holds it once.
- Open-Sora-Plan's image branch calls the image rule on a variable it has not assigned yet, so an image
  with an aesthetic score fails to load there and is replaced by a random other sample; frameloom applies
  the image phrases.
- An empty caption (an unconditional sample) stays empty: a suffix alone would teach the model that
  "24 FPS." is what an unconditional video looks like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from frameloom.errors import FrameloomError

if TYPE_CHECKING:
    from frameloom.data.video import ClipSpec

LOW_AESTHETIC = 4.25
"""Scores at or below this get a low-aesthetic phrase (Open-Sora-Plan)."""
HIGH_AESTHETIC = 5.75
"""Scores at or above this get a high-aesthetic phrase (Open-Sora-Plan)."""

AESTHETIC_MODES: tuple[str, ...] = ("off", "fixed", "random")

LOW_VIDEO: tuple[str, ...] = (
    "This video has a low aesthetic quality.",
    "The beauty of this video is minimal.",
    "This video scores low in aesthetic appeal.",
    "The aesthetic quality of this video is below average.",
    "This video ranks low for beauty.",
    "The artistic quality of this video is lacking.",
    "This video has a low score for aesthetic value.",
    "The visual appeal of this video is low.",
    "This video is rated low for beauty.",
    "The aesthetic quality of this video is poor.",
)
HIGH_VIDEO: tuple[str, ...] = (
    "This video has a high aesthetic quality.",
    "The beauty of this video is exceptional.",
    "This video scores high in aesthetic value.",
    "With its harmonious colors and balanced composition.",
    "This video ranks highly for aesthetic quality",
    "The artistic quality of this video is excellent.",
    "This video is rated high for beauty.",
    "The aesthetic quality of this video is impressive.",
    "This video has a top aesthetic score.",
    "The visual appeal of this video is outstanding.",
)
# The seed's low image list is the video list with "image" for "video" (its high list differs more).
LOW_IMAGE: tuple[str, ...] = tuple(p.replace("video", "image") for p in LOW_VIDEO)
HIGH_IMAGE: tuple[str, ...] = (
    "This image has a high aesthetic quality.",
    "The beauty of this image is exceptional",
    "This photo scores high in aesthetic value.",
    "With its harmonious colors and balanced composition.",
    "This image ranks highly for aesthetic quality.",
    "The artistic quality of this photo is excellent.",
    "This image is rated high for beauty.",
    "The aesthetic quality of this image is impressive.",
    "This photo has a top aesthetic score.",
    "The visual appeal of this image is outstanding.",
)


class CaptionError(FrameloomError, ValueError):
    """An invalid caption rule setting."""


def opensora_clip_fps(source_fps: float, stride: float) -> int:
    """The frame rate Open-Sora reports for a clip: ``source_fps // stride`` (floor), e.g. 30 // 2 = 15,
    29.97 // 1 = 29.

    Computed as ``floor(source_fps / stride + 1e-6)``: with a float stride ``fps / target_fps`` (Open-Sora-Plan's
    rule) Python's ``//`` gives 25 // (25 / 24) = 23.0, one below the 24 fps the clip has; the 1e-6 absorbs
    that float error (integer strides, Open-Sora's own rule, give the same result either way).
    """
    if stride <= 0:
        raise CaptionError(f"stride must be positive, got {stride}")
    return math.floor(float(source_fps) / float(stride) + 1e-6)


def fps_suffix(text: str, fps: float) -> str:
    """Open-Sora's caption suffix: ``"a cat" -> "a cat 15 FPS."``. Empty text stays empty (module doc)."""
    if not text:
        return text
    value = int(fps) if float(fps).is_integer() else fps
    return f"{text} {value} FPS."


def motion_score(row: Mapping[str, Any]) -> int | None:
    """Open-Sora 2.0's motion score of a row: ``int(score + 0.5)`` of its ``motion`` column (Open-Sora's
    ``score_vmafmotion`` when the manifest kept that name); None when absent or NaN."""
    value = row.get("motion")
    if value is None:
        value = row.get("score_vmafmotion")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(float(value) + 0.5)


def aesthetic_phrases(score: float, is_image: bool = False) -> tuple[str, ...]:
    """The phrase list a score selects: low (<= 4.25), high (>= 5.75), or none in between."""
    if score <= LOW_AESTHETIC:
        return LOW_IMAGE if is_image else LOW_VIDEO
    if score >= HIGH_AESTHETIC:
        return HIGH_IMAGE if is_image else HIGH_VIDEO
    return ()


def add_aesthetic(
    text: str,
    score: float | None,
    *,
    is_image: bool = False,
    mode: str = "fixed",
    draw: tuple[int, int, int] | None = None,
) -> str:
    """Open-Sora-Plan's aesthetic phrase, joined to the caption with one space.

    ``mode``: ``off`` (unchanged), ``fixed`` (the list's first phrase, after the caption), ``random`` (a
    phrase and a side drawn from ``draw = (seed, sample index, epoch)``, as the seed draws them per load).
    No score, a score between the thresholds, or an empty caption: unchanged.
    """
    if mode not in AESTHETIC_MODES:
        raise CaptionError(f"caption_aesthetic must be one of {', '.join(AESTHETIC_MODES)}, got {mode!r}")
    if mode == "off" or score is None or not text:
        return text
    phrases = aesthetic_phrases(float(score), is_image)
    if not phrases:
        return text
    if mode == "fixed":
        return f"{text} {phrases[0]}"
    if draw is None:
        raise CaptionError("caption_aesthetic 'random' needs draw=(seed, sample index, epoch)")
    from frameloom.data.video import draw_int  # video imports av/torch; keep this module light otherwise

    seed, index, epoch = draw
    phrase = phrases[draw_int(0, len(phrases) - 1, seed, index, epoch, "aesthetic_phrase")]
    before = draw_int(0, 1, seed, index, epoch, "aesthetic_side") == 1
    return f"{phrase} {text}" if before else f"{text} {phrase}"


def apply_caption_rules(
    text: str,
    row: Mapping[str, Any],
    *,
    aesthetic: str = "off",
    fps_suffix_on: bool = False,
    stride: float = 1.0,
    draw: tuple[int, int, int] | None = None,
    motion_score_on: bool = False,
) -> str:
    """A row's training caption: the aesthetic phrase first (Open-Sora-Plan), then the fps suffix and the
    motion score (Open-Sora), each only when asked for. ``stride`` is the clip's frame stride (for the fps
    suffix); images (``is_image`` or fps 0) never get an fps suffix. Open-Sora 2.0 joins its suffixes into
    one sentence (``VideoTextDataset``): ``"a cat 24 FPS, 3 motion score."``, ``"a cat 3 motion score."``."""
    is_image = bool(row.get("is_image"))
    text = add_aesthetic(text, row.get("aesthetic"), is_image=is_image, mode=aesthetic, draw=draw)
    if not text:
        return text
    parts = []
    fps = float(row.get("fps") or 0.0)
    if fps_suffix_on and not is_image and fps > 0:
        parts.append(f"{opensora_clip_fps(fps, stride)} FPS")
    score = motion_score(row) if motion_score_on else None
    if score is not None:
        parts.append(f"{score} motion score")
    return f"{text} {', '.join(parts)}." if parts else text


@dataclass(frozen=True)
class CaptionRules:
    """A run's caption rules (``data.caption_aesthetic``, ``data.caption_fps_suffix``), applied by
    ``row_caption`` wherever a row's caption becomes text for the encoder: the cache builder, the cached
    dataset's text keys and the on-the-fly dataset, so cached and uncached runs encode the same text."""

    aesthetic: str = "off"
    fps_suffix: bool = False
    motion_score: bool = False
    """Open-Sora 2.0: append the row's motion score (``data.caption_motion_score``)."""

    def __post_init__(self) -> None:
        if self.aesthetic not in AESTHETIC_MODES:
            raise CaptionError(
                f"data.caption_aesthetic must be one of {', '.join(AESTHETIC_MODES)}, got {self.aesthetic!r}"
            )

    @property
    def active(self) -> bool:
        return self.aesthetic != "off" or self.fps_suffix or self.motion_score

    @property
    def per_epoch(self) -> bool:
        """Whether a row's text changes from epoch to epoch (``random`` aesthetic mode): one cached
        embedding per row cannot hold it."""
        return self.aesthetic == "random"


def row_caption(
    row: Mapping[str, Any],
    rules: CaptionRules | None = None,
    spec: ClipSpec | None = None,
    draw: tuple[int, int, int] | None = None,
) -> str:
    """The text a row is trained with: its ``text`` column (``""`` when empty) with ``rules`` applied.

    ``spec`` is the clip spec the row is decoded with (its bucket's, under a bucket policy): the fps suffix
    reports ``source fps // clip_stride(source fps, spec)``. ``draw = (seed, sample index, epoch)`` is needed
    by the ``random`` aesthetic mode only.
    """
    value = row.get("text")
    text = "" if value is None else str(value)
    if rules is None or not rules.active:
        return text
    stride = 1.0
    fps = float(row.get("fps") or 0.0)
    if rules.fps_suffix and spec is not None and fps > 0 and not row.get("is_image"):
        from frameloom.data.video import clip_stride  # video imports av/torch; keep this module light

        stride = clip_stride(fps, spec)
    return apply_caption_rules(
        text,
        row,
        aesthetic=rules.aesthetic,
        fps_suffix_on=rules.fps_suffix,
        stride=stride,
        draw=draw,
        motion_score_on=rules.motion_score,
    )


__all__ = [
    "AESTHETIC_MODES",
    "HIGH_AESTHETIC",
    "LOW_AESTHETIC",
    "CaptionError",
    "CaptionRules",
    "add_aesthetic",
    "aesthetic_phrases",
    "apply_caption_rules",
    "fps_suffix",
    "motion_score",
    "opensora_clip_fps",
    "row_caption",
]
