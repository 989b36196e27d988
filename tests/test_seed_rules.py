"""Seed rules reproduced (or deliberately different, and documented), each against hand-computed values:
CogVideoX's frame spreading, Open-Sora-Plan's caption choice and cleaning, its speed factor and unknown-fps
rule under buckets, the seeds' temporal-crop range, and Open-Sora's per-row randomness."""

from __future__ import annotations

import numpy as np
import pytest

from frameloom.config.schema import Config
from frameloom.data.buckets import (
    Columns,
    FixedPolicy,
    OpenSoraPlanPolicy,
    TemporalPolicy,
    stream_key,
    uniform,
)
from frameloom.data.captions import CaptionRules, caption_variants, choose_caption, clean_caption, row_caption
from frameloom.data.probe import probe_file
from frameloom.data.video import ClipError, ClipSpec, decode_clip, frame_indices
from media import frame_index_of, index_frames, write_video


def _cols(frames, fps, h=64, w=64) -> Columns:
    n = len(frames)
    return Columns(
        frames=np.asarray(frames, np.int32),
        height=np.full(n, h, np.int32),
        width=np.full(n, w, np.int32),
        fps=np.asarray(fps, np.float64),
        is_image=np.zeros(n, bool),
    )


# ------------------------------------------------------------------------------------- CogVideoX spread


@pytest.mark.parametrize(
    "n, f, expected",
    [
        (100, 49, list(range(0, 98, 2))),  # range(0, 100, 2)[:49]: stride 100 // 49 = 2
        (60, 49, list(range(49))),  # stride 1: the first 49
        (49, 49, list(range(49))),
        (200, 13, list(range(0, 13 * 15, 15))),  # stride 200 // 13 = 15
    ],
)
def test_cogvideox_spreads_the_clip_over_the_video(n, f, expected):
    # finetune/datasets/utils.py: indices = list(range(0, N, N // F)); frames[:F]
    assert frame_indices(n, 24.0, ClipSpec(f, frame_spread=True)) == expected
    assert expected == list(range(0, n, n // f))[:f]


def test_fixed_policy_spreads_unless_a_stride_rule_is_set(tmp_path):
    cfg = Config()
    cfg.data.bucket, cfg.data.num_frames, cfg.data.height, cfg.data.width = "fixed", 5, 16, 16
    policy = FixedPolicy(_cols([40, 3], [24.0, 24.0]), 0, cfg)
    spec = policy.clip_spec(ClipSpec(5), 24.0, 0)
    assert spec.frame_spread and spec.key().endswith("-spread")
    assert policy.assign(0).bucket.tolist() == [0, -1]  # 3 frames < 5: left out (the seed pads, see docs)
    with_stride = policy.clip_spec(ClipSpec(5, frame_stride=2.0), 24.0, 0)
    assert not with_stride.frame_spread
    # Pyramid Flow's temporal policy takes the first frames, no spreading.
    cfg.data.bucket, cfg.data.num_frames = "temporal", 17
    assert not TemporalPolicy(_cols([40], [24.0]), 0, cfg).clip_spec(ClipSpec(17), 24.0, 0).frame_spread
    # Decoded: 40 frames, 5 spread -> stride 8: frames 0, 8, 16, 24, 32.
    path = write_video(tmp_path / "v.mp4", index_frames(40, 16, 16), fps=24)
    video = decode_clip(probe_file(path), spec)
    assert [frame_index_of(video[:, t].numpy()) for t in range(5)] == [0, 8, 16, 24, 32]
    with pytest.raises(ClipError, match="spreads 5 frames over the video, which has 3"):
        frame_indices(3, 24.0, spec)


# ------------------------------------------------------------------------------------ Open-Sora-Plan


def test_caption_choice_is_drawn_per_epoch_and_the_cache_holds_every_caption():
    row = {"text": "one", "captions": ["one", "two", "three"]}
    rules = CaptionRules(choice="random")
    picks = [row_caption(row, rules, draw=(0, 5, epoch)) for epoch in range(60)]
    assert set(picks) == {"one", "two", "three"}  # random.choice(cap) per load
    assert picks == [row_caption(row, rules, draw=(0, 5, epoch)) for epoch in range(60)]  # a pure function
    assert row_caption(row, CaptionRules(choice="first"), draw=(0, 5, 1)) == "one"
    assert caption_variants(row, rules) == ["one", "two", "three"]
    assert choose_caption({"text": "solo"}, "random", (0, 0, 0)) == "solo"  # one caption: nothing to draw
    cleaned = CaptionRules(choice="random", clean="opensora_plan", aesthetic="fixed")
    row = {"text": "A Cat", "captions": ["A Cat", "A DOG"], "aesthetic": 6.0}
    assert caption_variants(row, cleaned) == [
        "a cat this video has a high aesthetic quality.",
        "a dog this video has a high aesthetic quality.",
    ]


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        # Hand-checked against v1.3 text_preprocessing (clean_caption), which the report compares on 20,026
        # strings; the seed itself is not imported (BeautifulSoup and ftfy are not dependencies).
        ("A  Cat&amp;Dog @bob  ", "a cat dog"),
        ("Visit https://x.com/a now", "visit now"),
        ("<b>Bold</b> move", "bold move"),
        ("a cat 1920x1080 page 3", "a cat"),
        ("this-is-my-cute-cat", "this is my cute cat"),
        ('"quoted"', "quoted"),
        ("file.mp4 here", "here"),
        ("A+B%20c", "a b c"),
        ("Free shipping worldwide! click for details", "worldwide!"),
        ("中文 caption", "中文 caption"),  # mT5 (v1.3): ideographs kept
    ],
)
def test_opensora_plan_caption_cleaning(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_the_seed_cleans_the_printed_one_element_list():
    # The seed passes [caption] to text_preprocessing, which calls str() on it: it cleans "['a\\tb']". For
    # ordinary captions the brackets and quotes cancel out; escapes do not (a tab trains as "a tb"), and a
    # caption with both quote kinds keeps a stray one. Reproduced (values checked against the seed's code).
    rules = CaptionRules(clean="opensora_plan")
    assert row_caption({"text": "A Cat"}, rules) == "a cat"
    assert row_caption({"text": "a\tb"}, rules) == "a tb"
    assert clean_caption("a\tb") == "a b"  # the caption itself would give this
    assert row_caption({"text": 'quote\'s "both"'}, rules) == "quote 's \"both"
    assert row_caption({"text": ""}, rules) == ""  # unconditional stays empty


def test_speed_factor_divides_by_data_num_frames_under_buckets():
    # The seed caps the speed by len(indices) / args.num_frames, the run's num_frames, also for a sample whose
    # bucket is shorter. A bucket's clip spec keeps that reference (speed_frames).
    cfg = Config()
    cfg.data.bucket, cfg.data.num_frames, cfg.data.max_hxw, cfg.data.speed_factor = (
        "opensora_plan",
        93,
        4096,
        4.0,
    )
    cfg.train.batch_size, cfg.data.megabatch = 1, 1
    policy = OpenSoraPlanPolicy(_cols([200] * 4, [24.0] * 4), 0, cfg)
    spec = policy.clip_spec(ClipSpec(93, speed_factor=4.0), 24.0, 0)
    assert (spec.num_frames, spec.speed_frames) == (93, 93) and "-sfn93" in spec.key()
    # A 29-frame bucket of that run: sf = min(4, 200 / 93) = 2.1505 -> int(200 / 2.1505) = 93 positions,
    # linspace(0, 199, 93) has step 199 / 92 = 2.163: 0, 2, 4, 6, 8, 10, 12, 15 ...
    short = ClipSpec(29, speed_factor=4.0, speed_frames=93)
    assert frame_indices(200, 24.0, short)[:8] == [0, 2, 4, 6, 8, 10, 12, 15]
    # Dividing by the bucket's own 29 frames would allow the full 4: 50 positions, step 199 / 49 = 4.06.
    assert frame_indices(200, 24.0, ClipSpec(29, speed_factor=4.0))[:4] == [0, 4, 8, 12]


def test_unknown_fps_is_24_for_the_policy_and_the_decoder():
    # Open-Sora-Plan: fps = i.get('fps', 24). The policy counts frames at 24 / 12 = stride 2; the bucket's
    # clip spec must decode at the same stride (it used to decode every frame).
    cfg = Config()
    cfg.data.bucket, cfg.data.num_frames, cfg.data.max_hxw, cfg.data.target_fps = (
        "opensora_plan",
        29,
        4096,
        12.0,
    )
    cfg.train.batch_size, cfg.data.megabatch = 1, 1
    policy = OpenSoraPlanPolicy(_cols([80] * 4, [float("nan")] * 4), 0, cfg)
    assert policy.frame_counts()[0].tolist() == [29] * 4  # ceil(80 / 2) = 40 -> 29
    spec = policy.clip_spec(ClipSpec(29, target_fps=12.0), None, 0)
    assert spec.frame_stride == 2.0
    assert frame_indices(80, 0.0, spec) == list(range(0, 58, 2))


# ----------------------------------------------------------------------------------------------- Open-Sora


def test_opensora_per_row_draws_are_not_shifted_copies():
    # Open-Sora 2.0 seeds numpy with seed + epoch + index, so row i at epoch e + 1 draws exactly what row
    # i + 1 drew at epoch e. frameloom keys (seed, epoch, row, draw) by hashing (docs/datasets.md): same
    # rules, no correlation between neighbouring rows across epochs.
    rows = np.arange(1000)
    e0 = uniform(stream_key(0, 0, 1), rows)
    e1 = uniform(stream_key(0, 1, 1), rows)
    assert not np.allclose(e1[:-1], e0[1:])
    assert abs(np.corrcoef(e1[:-1], e0[1:])[0, 1]) < 0.1
    assert np.array_equal(e0, uniform(stream_key(0, 0, 1), rows))  # still a pure function
