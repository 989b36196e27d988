"""Caption rules of the seed systems, as small pure functions.

- Open-Sora appends the clip's frame rate: ``"{text} {fps} FPS."`` (2.0 ``datasets.py``/``map_target_fps``):
  below ``fps_max`` the raw rate (stride 1: "23.976 FPS."), else ``floor(fps / stride)`` ("15 FPS.").
- Open-Sora 2.0 appends the row's motion score (``"{text} 3 motion score."``; with the frame rate
  ``"{text} 24 FPS, 3 motion score."``), rounded half up from its VMAF motion score.
- Open-Sora-Plan picks one of a record's captions (``cap``) at random on every load, adds the aesthetic
  phrase, then cleans the text (``text_preprocessing``: PixArt's ``clean_caption``); ``caption_choice`` and
  ``caption_clean`` reproduce both.
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
- Open-Sora prints the rate as pandas holds it, so a float column gives "24.0 FPS."; frameloom writes whole
  rates without the ".0" ("24 FPS.") and others to 3 decimals, as Open-Sora's meta tools round them.
- Cleaning: ftfy's mojibake repair is not applied (ftfy is not a dependency) and HTML is parsed by Python's
  ``html.parser`` where the seed uses BeautifulSoup's; CJK ideographs are kept (v1.3's mT5 encoder,
  ``support_Chinese``). The seed calls ``text_preprocessing`` on a one-element *list*, so it cleans the
  printed list (``"['a cat']"``); that is reproduced: brackets and quotes cancel out for ordinary captions,
  but escapes show (a tab prints as ``\t`` and "a<TAB>b" trains as "a tb").
- The random caption choice is a pure function of (seed, sample index, epoch) (mode ``random``); the cache
  holds every caption of a row, so a cached run draws as an uncached one does.
"""

from __future__ import annotations

import html
import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from frameloom.errors import FrameloomError

if TYPE_CHECKING:
    from frameloom.data.video import ClipSpec

LOW_AESTHETIC = 4.25
"""Scores at or below this get a low-aesthetic phrase (Open-Sora-Plan)."""
HIGH_AESTHETIC = 5.75
"""Scores at or above this get a high-aesthetic phrase (Open-Sora-Plan)."""

AESTHETIC_MODES: tuple[str, ...] = ("off", "fixed", "random")
CHOICE_MODES: tuple[str, ...] = ("first", "random")
CLEAN_MODES: tuple[str, ...] = ("off", "opensora_plan")

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


def opensora_clip_fps(source_fps: float, stride: float) -> float:
    """The frame rate Open-Sora reports for a clip (2.0 ``map_target_fps``): at stride 1 (a video below
    ``fps_max``) the source's own rate, to 3 decimals (23.976); otherwise ``floor(source_fps / stride)``,
    e.g. 30 / 2 = 15, 60 / 3 = 20.

    The floor is computed as ``floor(source_fps / stride + 1e-6)``: with a float stride ``fps / target_fps``
    (Open-Sora-Plan's rule) Python's ``//`` gives 25 // (25 / 24) = 23.0, one below the 24 fps the clip has;
    the 1e-6 absorbs that float error (integer strides, Open-Sora's own rule, give the same result).
    """
    if stride <= 0:
        raise CaptionError(f"stride must be positive, got {stride}")
    if abs(float(stride) - 1.0) < 1e-9:
        return round(float(source_fps), 3)
    return float(math.floor(float(source_fps) / float(stride) + 1e-6))


def fps_suffix(text: str, fps: float) -> str:
    """Open-Sora's caption suffix: ``"a cat" -> "a cat 15 FPS."`` / ``"a cat 23.976 FPS."``. Whole rates are
    written without ".0". Empty text stays empty (module doc)."""
    if not text:
        return text
    return f"{text} {_rate_text(fps)} FPS."


def _rate_text(fps: float) -> str:
    """A frame rate as the caption says it: whole rates without ".0", others to 3 decimals (23.976)."""
    return str(int(fps)) if float(fps).is_integer() else str(round(float(fps), 3))


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


# ------------------------------------------------------------------------------------ caption cleaning


class _Text(HTMLParser):
    """The text of an HTML fragment (tags dropped, character references resolved)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(text: str) -> str:
    parser = _Text()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _sub(pattern: str, repl: str, text: str, flags: int = 0) -> str:
    return re.sub(pattern, repl, text, flags=flags)


_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}"
_MEDIA_WORDS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
# CJK strokes, katakana extensions, enclosed letters, compatibility forms, extension A, hexagram symbols.
_CJK_MARKS = (
    "\u31c0-\u31ef",
    "\u31f0-\u31ff",
    "\u3200-\u32ff",
    "\u3300-\u33ff",
    "\u3400-\u4dbf",
    "\u4dc0-\u4dff",
)


def clean_caption(text: str) -> str:
    """Open-Sora-Plan's caption cleaning (v1.3 ``text_preprocessing``, PixArt's ``clean_caption``), step by step:

    1. URL-unquote (``+`` is a space), trim, lower-case; ``<person>`` -> ``person``;
    2. drop URLs, HTML tags (keeping their text), ``@nicknames`` and CJK strokes/symbols (ideographs stay);
    3. every dash to ``-``; curly and angle quotes to ``"`` and ``'``; drop ``&quot``/``&amp``; IP addresses
       and a literal ``\\n`` to spaces; drop ``#12``, ``#12345..`` tags, numbers of 6+ digits, file names;
    4. runs of quotes to one ``"``, runs of dots and "bad punctuation" (``#®•©™&@·º½¾¿¡§~()[]{}|\\/*``) to a space;
       ``" . "`` to a space; with more than three ``-``/``_``, all of them to spaces;
    5. unescape HTML entities (twice), trim; drop codes like ``jc6640``, ``6640vc231``, "free shipping",
       "download", "click for ...", file-type words, ``page 12``, sizes like ``1920x1080``;
    6. ``" : "`` to ``": "``, a space after ``,``/``.``/``/`` that follow a non-digit, collapse spaces; strip
       surrounding quotes, a leading ``'_,-:;`` and a trailing ``'_,-:+``; a lone ``.word`` is dropped.

    Not reproduced: ftfy's mojibake repair (see the module doc). Example: ``"A  Cat&amp;Dog @bob  "`` ->
    ``"a cat dog"``.
    """
    t = urllib.parse.unquote_plus(str(text)).strip().lower()
    t = t.replace("<person>", "person")
    # 2. Links, markup, handles, CJK marks.
    t = _sub(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", "", t)
    t = _sub(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", "", t)
    t = _html_text(t)
    t = _sub(r"@[\w\d]+\b", "", t)
    for span in _CJK_MARKS:
        t = _sub(f"[{span}]+", "", t)
    # 3. Dashes, quotes, entities, numbers and names that carry no meaning.
    t = _sub(f"[{_DASHES}]+", "-", t)
    t = _sub(r"[`´«»“”¨]", '"', t)
    t = _sub(r"[‘’]", "'", t)
    t = _sub(r"&quot;?", "", t)
    t = _sub(r"&amp", "", t)
    t = _sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", t)
    t = _sub(r"\d:\d\d\s+$", "", t)
    t = _sub(r"\\n", " ", t)
    t = _sub(r"#\d{1,3}\b", "", t)
    t = _sub(r"#\d{5,}\b", "", t)
    t = _sub(r"\b\d{6,}\b", "", t)
    t = _sub(r"[\S]+\.(?:" + _MEDIA_WORDS + ")", "", t)
    # 4. Punctuation runs.
    t = _sub(r"[\"\']{2,}", '"', t)
    t = _sub(r"[\.]{2,}", " ", t)
    t = _sub(_BAD_PUNCT, " ", t)
    t = _sub(r"\s+\.\s+", " ", t)
    if len(re.findall(r"(?:\-|\_)", t)) > 3:
        t = _sub(r"(?:\-|\_)", " ", t)
    # 5. Entities, then codes and shop phrases.
    t = html.unescape(html.unescape(t)).strip()
    t = _sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", t)
    t = _sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", t)
    t = _sub(r"\b\d+[a-zA-Z]+\d+\b", "", t)
    t = _sub(r"(worldwide\s+)?(free\s+)?shipping", "", t)
    t = _sub(r"(free\s)?download(\sfree)?", "", t)
    t = _sub(r"\bclick\b\s(?:for|on)\s\w+", "", t)
    t = _sub(r"\b(?:" + _MEDIA_WORDS + r")(\simage[s]?)?", "", t)
    t = _sub(r"\bpage\s+\d+\b", "", t)
    t = _sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " ", t)
    t = _sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", t)
    # 6. Spacing and the ends.
    t = _sub(r"\b\s+\:\s+", ": ", t)
    t = _sub(r"(\D[,\./])\b", r"\1 ", t)
    t = _sub(r"\s+", " ", t)
    t = _sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", t)
    t = _sub(r"^[\'\_,\-\:;]", "", t)
    t = _sub(r"[\'\_,\-\:\-\+]$", "", t)
    t = _sub(r"^\.\S+$", "", t)
    return t.strip()


def choose_caption(
    row: Mapping[str, Any], mode: str = "first", draw: tuple[int, int, int] | None = None
) -> str:
    """The caption a row is trained with before any rule: one of its ``captions`` (when it has several) or
    its ``text``. ``random`` draws uniformly from (seed, sample index, epoch) (Open-Sora-Plan's
    ``random.choice(cap)`` per load); without a draw, and in mode ``first``, the first one."""
    captions = row.get("captions")
    if mode not in CHOICE_MODES:
        raise CaptionError(f"data.caption_choice must be one of {', '.join(CHOICE_MODES)}, got {mode!r}")
    if captions and len(captions) > 1 and mode == "random" and draw is not None:
        from frameloom.data.video import draw_int  # video imports av/torch; keep this module light otherwise

        seed, index, epoch = draw
        return str(captions[draw_int(0, len(captions) - 1, seed, index, epoch, "caption_choice")] or "")
    if captions and mode == "random" and draw is None and row.get("text") is None:
        return str(captions[0] or "")
    value = row.get("text")
    return "" if value is None else str(value)


def apply_caption_rules(
    text: str,
    row: Mapping[str, Any],
    *,
    aesthetic: str = "off",
    fps_suffix_on: bool = False,
    stride: float = 1.0,
    draw: tuple[int, int, int] | None = None,
    clean: str = "off",
    motion_score_on: bool = False,
) -> str:
    """A row's training caption: the aesthetic phrase first and then the cleaning (Open-Sora-Plan's order),
    then the fps suffix and the motion score (Open-Sora), each only when asked for. ``stride`` is the clip's
    frame stride (for the fps suffix); images (``is_image`` or fps 0) never get an fps suffix. Open-Sora 2.0
    joins its suffixes into one sentence (``VideoTextDataset``): ``"a cat 24 FPS, 3 motion score."``,
    ``"a cat 3 motion score."``."""
    is_image = bool(row.get("is_image"))
    text = add_aesthetic(text, row.get("aesthetic"), is_image=is_image, mode=aesthetic, draw=draw)
    if clean not in CLEAN_MODES:
        raise CaptionError(f"data.caption_clean must be one of {', '.join(CLEAN_MODES)}, got {clean!r}")
    if clean == "opensora_plan" and text:
        text = clean_caption(str([text]))  # the seed cleans the printed one-element list (module doc)
    if not text:
        return text
    parts = []
    fps = float(row.get("fps") or 0.0)
    if fps_suffix_on and not is_image and fps > 0:
        parts.append(f"{_rate_text(opensora_clip_fps(fps, stride))} FPS")
    score = motion_score(row) if motion_score_on else None
    if score is not None:
        parts.append(f"{score} motion score")
    return f"{text} {', '.join(parts)}." if parts else text


@dataclass(frozen=True)
class CaptionRules:
    """A run's caption rules (``data.caption_aesthetic``, ``data.caption_fps_suffix``,
    ``data.caption_motion_score``, ``data.caption_choice``, ``data.caption_clean``), applied by
    ``row_caption`` wherever a row's caption becomes text for the encoder: the cache builder, the cached
    dataset's text keys and the on-the-fly dataset, so cached and uncached runs encode the same text."""

    aesthetic: str = "off"
    fps_suffix: bool = False
    motion_score: bool = False
    """Open-Sora 2.0: append the row's motion score (``data.caption_motion_score``)."""
    choice: str = "first"
    clean: str = "off"

    def __post_init__(self) -> None:
        for name, value, modes in (
            ("caption_aesthetic", self.aesthetic, AESTHETIC_MODES),
            ("caption_choice", self.choice, CHOICE_MODES),
            ("caption_clean", self.clean, CLEAN_MODES),
        ):
            if value not in modes:
                raise CaptionError(f"data.{name} must be one of {', '.join(modes)}, got {value!r}")

    @property
    def active(self) -> bool:
        return (
            self.aesthetic != "off"
            or self.fps_suffix
            or self.motion_score
            or self.choice != "first"
            or self.clean != "off"
        )

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
    if rules is None or not rules.active:
        value = row.get("text")
        return "" if value is None else str(value)
    text = choose_caption(row, rules.choice, draw)
    return _ruled(text, row, rules, spec, draw)


def _ruled(text: str, row: Mapping[str, Any], rules: CaptionRules, spec: ClipSpec | None, draw: Any) -> str:
    stride = 1.0
    fps = float(row.get("fps") or 0.0)
    if rules.fps_suffix and spec is not None and fps > 0 and not row.get("is_image"):
        from frameloom.data.video import clip_stride  # video imports av/torch; keep this module light

        stride = 1.0 if spec.frame_spread else clip_stride(fps, spec)
    return apply_caption_rules(
        text,
        row,
        aesthetic=rules.aesthetic,
        fps_suffix_on=rules.fps_suffix,
        stride=stride,
        draw=draw,
        clean=rules.clean,
        motion_score_on=rules.motion_score,
    )


def caption_variants(
    row: Mapping[str, Any], rules: CaptionRules | None = None, spec: ClipSpec | None = None
) -> list[str]:
    """Every text ``row_caption`` can give this row, in order, without repeats: one per caption under
    ``caption_choice: random`` (so the cache can hold them all), else the one. Not for the ``random``
    aesthetic mode (its phrases change per epoch)."""
    if rules is None or not rules.active:
        return [row_caption(row, rules, spec)]
    captions = row.get("captions")
    if rules.choice == "random" and captions and len(captions) > 1:
        texts = [_ruled("" if c is None else str(c), row, rules, spec, None) for c in captions]
        return list(dict.fromkeys(texts))
    return [row_caption(row, rules, spec)]


__all__ = [
    "AESTHETIC_MODES",
    "HIGH_AESTHETIC",
    "LOW_AESTHETIC",
    "CaptionError",
    "CaptionRules",
    "CHOICE_MODES",
    "CLEAN_MODES",
    "add_aesthetic",
    "caption_variants",
    "choose_caption",
    "clean_caption",
    "aesthetic_phrases",
    "apply_caption_rules",
    "fps_suffix",
    "motion_score",
    "opensora_clip_fps",
    "row_caption",
]
