"""The seeds' frame and caption rules: strides, valid lengths, speed factor, seeded temporal crop, captions.

Expected values are computed by hand from the rules in SEED_FACTS.md (derivations in the comments).
"""

from __future__ import annotations

from collections import Counter

import pytest

from frameloom.config.schema import Config
from frameloom.data.captions import (
    HIGH_VIDEO,
    LOW_VIDEO,
    CaptionError,
    CaptionRules,
    add_aesthetic,
    apply_caption_rules,
    fps_suffix,
    opensora_clip_fps,
    row_caption,
)
from frameloom.data.probe import probe_file
from frameloom.data.video import (
    ClipError,
    ClipSpec,
    check_length,
    decode_clip,
    draw_int,
    frame_indices,
    is_valid_length,
    latent_length,
    opensora_stride,
    speed_positions,
    temporal_crop_offset,
    valid_length,
)
from frameloom.errors import FrameloomError
from frameloom.pipeline import clip_spec
from media import frame_index_of, index_frames, write_video

# ------------------------------------------------------------------------------------------------ strides


@pytest.mark.parametrize(
    "fps, fps_max, stride",
    [
        (60.0, 24.0, 3),  # ceil(2.5)
        (24.0, 24.0, 1),  # ceil(1.0)
        (30.0, 24.0, 2),  # ceil(1.25)
        (29.97, 30.0, 1),  # ceil(0.999)
        (48.0, 24.0, 2),  # exactly 2, not rounded up by float error
        (120.0, 30.0, 4),
        (12.0, 24.0, 1),  # slower than fps_max: every frame
    ],
)
def test_opensora_integer_stride(fps, fps_max, stride):
    assert opensora_stride(fps, fps_max) == stride


def test_fps_max_in_frame_indices():
    # 60 fps, fps_max 24 -> stride 3: frames 0, 3, 6, 9.
    assert frame_indices(100, 60.0, ClipSpec(4, fps_max=24)) == [0, 3, 6, 9]
    with pytest.raises(ClipError, match="at most one"):
        frame_indices(100, 60.0, ClipSpec(4, fps_max=24, target_fps=12))
    assert frame_indices(100, 0.0, ClipSpec(4, fps_max=24)) == [0, 1, 2, 3]  # unknown rate: every frame


def test_opensora_plan_float_stride_from_cut_start(tmp_path):
    # Open-Sora-Plan: indices = int(cut[0] + i * fps / train_fps). 30 fps -> 12 fps is stride 2.5; from
    # cut[0] = 10: 10, 12.5, 15, 17.5, 20 -> 10, 12, 15, 17, 20.
    path = write_video(tmp_path / "v.mp4", index_frames(30, 16, 16), fps=30)
    row = probe_file(path) | {"cut_start": 10, "cut_end": 30}
    video = decode_clip(row, ClipSpec(5, target_fps=12))
    assert [frame_index_of(video[:, t].numpy()) for t in range(5)] == [10, 12, 15, 17, 20]


# ---------------------------------------------------------------------------------------- valid lengths


@pytest.mark.parametrize(
    "policy, sp, n, expected",
    [
        ("4k+1", 1, 16, 13),  # 16 - (15 % 4) = 13
        ("4k+1", 1, 17, 17),
        ("4k+1", 1, 1, 1),
        ("4k+1", 1, 0, 0),
        ("8n+1", 1, 16, 9),  # 16 - (15 % 8)
        ("8n+1", 1, 49, 49),
        ("8n+1", 1, 48, 41),
        ("pyramid", 1, 121, 121),  # (121 - 1) // 8 * 8 + 1
        ("pyramid", 1, 130, 129),
        # opensora_plan, sp 1: latent <= (92 - 1) // 4 + 1 = 23 -> 4 * 22 + 1 = 89.
        ("opensora_plan", 1, 92, 89),
        ("opensora_plan", 1, 93, 93),  # latent 24
        ("opensora_plan", 1, 30, 29),  # latent 8
        ("opensora_plan", 1, 28, 0),  # below 29
        # sp 4: latent 23 -> multiple of 4: 20 -> 77; sp 8: 16 -> 61; sp 3: 21 -> 81.
        ("opensora_plan", 4, 92, 77),
        ("opensora_plan", 8, 92, 61),
        ("opensora_plan", 8, 93, 93),
        ("opensora_plan", 3, 92, 81),
    ],
)
def test_valid_length(policy, sp, n, expected):
    assert valid_length(n, policy, sp) == expected
    if expected:
        assert is_valid_length(expected, policy, sp)


def test_opensora_plan_valid_counts_match_the_seed_lists():
    # Open-Sora-Plan's find_closest_y comments (vae stride 4, model_ds_t = sp_size): sp 4: 29, 45, 61, 77,
    # 93 ...; sp 8: 29, 61, 93 ...; sp 1: every 4k+1 from 29.
    sp4 = [29, 45, 61, 77, 93, 109, 125]
    assert [n for n in range(1, 130) if is_valid_length(n, "opensora_plan", 4)] == sp4
    assert [n for n in range(1, 130) if is_valid_length(n, "opensora_plan", 8)] == [29, 61, 93, 125]
    assert [n for n in range(1, 42) if is_valid_length(n, "opensora_plan", 1)] == [29, 33, 37, 41]
    # valid_length is the largest valid count not above n, for every n.
    for sp in (1, 3, 4, 8):
        valid = [n for n in range(1, 200) if is_valid_length(n, "opensora_plan", sp)]
        for n in range(1, 200):
            assert valid_length(n, "opensora_plan", sp) == max([v for v in valid if v <= n], default=0)


def test_latent_lengths():
    assert latent_length(93, "opensora_plan") == 24  # (93 - 1) // 4 + 1
    assert latent_length(121, "pyramid") == 16  # (121 - 1) // 8 + 1
    assert latent_length(49, "8n+1") == 7
    assert latent_length(17, "4k+1") == 5


def test_check_length_names_the_nearest_counts():
    with pytest.raises(ClipError, match="nearest valid: 13 or 17"):
        check_length(16, "4k+1")
    with pytest.raises(ClipError, match="nearest valid: 29$"):
        check_length(20, "opensora_plan")
    with pytest.raises(ClipError, match="nearest valid: 61 or 93"):
        check_length(77, "opensora_plan", 8)
    with pytest.raises(ClipError, match="unknown frame policy"):
        check_length(17, "5k+1")
    check_length(49, "8n+1")


def test_policy_truncates_a_short_video():
    # 50 frames at stride 1, 8n+1, num_frames 97 as a maximum: 50 -> 49 frames, 0..48.
    assert frame_indices(50, 24.0, ClipSpec(97, frame_policy="8n+1")) == list(range(49))
    # opensora_plan needs at least 29.
    with pytest.raises(ClipError, match="fewer than the shortest"):
        frame_indices(28, 24.0, ClipSpec(93, frame_policy="opensora_plan"))
    # Without a policy the clip is exactly num_frames or an error.
    with pytest.raises(ClipError, match="needs 97 frames"):
        frame_indices(50, 24.0, ClipSpec(97, temporal_crop="random"), draw=(0, 0, 0))


# ----------------------------------------------------------------------------------------- speed factor


def test_speed_positions_by_hand():
    # 40 positions, 10 frames, speed 2: sf = min(2, 40 / 10) = 2 -> 20 positions, linspace(0, 39, 20) has step
    # 39 / 19 = 2.0526: floor(i * 2.0526) = 0, 2, 4, ..., 36 (i <= 18), and 39 at i = 19.
    assert speed_positions(40, 10, 2.0).tolist() == [*range(0, 38, 2), 39]
    # speed 10 is capped at 40 / 10 = 4: 10 positions, step 39 / 9 = 4.333.
    assert speed_positions(40, 10, 10.0).tolist() == [0, 4, 8, 13, 17, 21, 26, 30, 34, 39]
    # No room to speed up (positions <= frames) or speed 1: every position.
    assert speed_positions(8, 10, 3.0).tolist() == list(range(8))
    assert speed_positions(12, 10, 1.0).tolist() == list(range(12))
    with pytest.raises(ClipError):
        speed_positions(12, 10, 0.5)


def test_speed_factor_then_policy():
    # 200 frames, stride 1, speed 2, num_frames 29 under opensora_plan: sf = min(2, 200 / 29) = 2 -> 100
    # positions, step 199 / 99 = 2.0101; the first 29 are floor(2.0101 i) = 2 i (0.0101 i < 1 for i < 99).
    spec = ClipSpec(29, speed_factor=2.0, frame_policy="opensora_plan")
    assert frame_indices(200, 24.0, spec) == [2 * i for i in range(29)]


# ------------------------------------------------------------------------------------ temporal crop


def test_temporal_crop_is_a_pure_function_of_seed_sample_epoch():
    # 90 frames at stride 2.5 (30 -> 12 fps): ceil((90 - 1e-6) / 2.5) = 36 positions; a window of 29 starts
    # at positions 0..6: the seeds' TemporalRandomCrop draws randint(0, max(0, 36 - 29 - 1)).
    spec = ClipSpec(29, target_fps=12, temporal_crop="random", frame_policy="opensora_plan")
    first = frame_indices(90, 30.0, spec, draw=(7, 3, 0))
    assert frame_indices(90, 30.0, spec, draw=(7, 3, 0)) == first  # same draw, same clip
    offset = temporal_crop_offset(36, 29, (7, 3, 0))
    assert 0 <= offset <= 6
    assert first == [int(offset * 2.5 + i * 2.5 + 1e-6) for i in range(29)]
    # Across epochs (and samples) the window moves; every start 0..6 occurs, none beyond (7 would be the
    # last possible window, which the seeds never draw).
    offsets = Counter(temporal_crop_offset(36, 29, (7, 3, epoch)) for epoch in range(400))
    assert sorted(offsets) == list(range(7))
    assert min(offsets.values()) > 25  # 57 expected each; a stuck or biased draw fails
    # Another seed gives another sequence.
    assert [temporal_crop_offset(36, 29, (8, 3, e)) for e in range(20)] != [
        temporal_crop_offset(36, 29, (7, 3, e)) for e in range(20)
    ]
    # A window that fits, or one position shorter than the video, has nothing to draw (randint(0, 0)).
    assert temporal_crop_offset(29, 29, (7, 3, 0)) == 0
    assert {temporal_crop_offset(30, 29, (7, 3, e)) for e in range(50)} == {0}
    assert {temporal_crop_offset(31, 29, (7, 3, e)) for e in range(50)} == {0, 1}
    with pytest.raises(ClipError, match="needs draw"):
        frame_indices(90, 30.0, spec)


def test_draw_int_is_stable():
    # A pure hash, not an RNG: the same inputs give the same value in any process, in any order.
    values = [draw_int(0, 9, 1, i, 2, "x") for i in range(50)]
    assert values == [draw_int(0, 9, 1, i, 2, "x") for i in range(50)]
    assert set(values) <= set(range(10)) and len(set(values)) > 5
    assert draw_int(5, 5, 1, 2, 3, "x") == 5


def test_random_crop_decodes_the_drawn_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", index_frames(40, 16, 16), fps=24)
    row = probe_file(path)
    spec = ClipSpec(5, frame_stride=2, temporal_crop="random")
    # 40 frames at stride 2: 20 positions, window 5: offset 0..15.
    got = decode_clip(row, spec, draw=(1, 2, 3))
    expected = frame_indices(40, 24.0, spec, draw=(1, 2, 3))
    assert [frame_index_of(got[:, t].numpy()) for t in range(5)] == expected
    assert expected == [2 * (temporal_crop_offset(20, 5, (1, 2, 3)) + i) for i in range(5)]
    # Without a draw (the cache): one fixed window per sample, the same every time.
    assert torch_equal(decode_clip(row, spec), decode_clip(row, spec))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# ------------------------------------------------------------------------------------ spec and config


def test_default_spec_key_is_unchanged():
    # Cache keys written before the new fields existed must stay valid.
    assert ClipSpec(4).key() == "f4-sNone-fpsNone-st0-cNone-NonexNone"
    assert ClipSpec(4, fps_max=24).key().endswith("-fmax24")
    assert ClipSpec(4, temporal_crop="random").key() != ClipSpec(4).key()


def test_clip_spec_from_config():
    cfg = Config()
    cfg.data.num_frames, cfg.data.fps_max, cfg.data.frame_policy = 17, 24.0, "4k+1"
    cfg.data.temporal_crop, cfg.data.speed_factor = "random", 1.5
    spec = clip_spec(cfg)
    assert (spec.fps_max, spec.frame_policy, spec.temporal_crop, spec.speed_factor) == (
        24.0,
        "4k+1",
        "random",
        1.5,
    )
    cfg.data.num_frames = 16
    with pytest.raises(FrameloomError, match="nearest valid: 13 or 17"):
        clip_spec(cfg)
    cfg.data.num_frames, cfg.data.frame_policy = 93, "opensora_plan"
    cfg.parallel.sp_size = 8
    assert clip_spec(cfg).sp_size == 8
    cfg.data.target_fps = 12.0
    with pytest.raises(FrameloomError, match="at most one"):
        clip_spec(cfg)
    cfg.data.target_fps, cfg.data.temporal_crop = None, "middle"
    with pytest.raises(FrameloomError, match="temporal_crop"):
        clip_spec(cfg)


# --------------------------------------------------------------------------------------------- captions


def test_fps_suffix():
    # Open-Sora 2.0 map_target_fps: below fps_max (stride 1) the raw rate, else floor(fps / stride).
    assert opensora_clip_fps(30.0, 2) == 15
    assert opensora_clip_fps(29.97, 1) == 29.97
    assert opensora_clip_fps(23.976023976, 1) == 23.976
    assert opensora_clip_fps(60.0, 3) == 20
    assert fps_suffix("a cat", opensora_clip_fps(23.976023976, 1)) == "a cat 23.976 FPS."
    assert fps_suffix("a cat", opensora_clip_fps(24.0, 1)) == "a cat 24 FPS."
    # The whole rule at fps_max 24 (the stride from ClipSpec): 23.976 -> raw, 29.97 -> stride 2 -> 14.
    for fps, text in [
        (23.976, "x 23.976 FPS."),
        (29.97, "x 14 FPS."),
        (60.0, "x 20 FPS."),
        (24.0, "x 24 FPS."),
    ]:
        row = {"fps": fps, "text": "x"}
        assert row_caption(row, CaptionRules(fps_suffix=True), ClipSpec(4, fps_max=24)) == text
    # A float stride fps / target_fps reports the target: 25 / (25 / 24) = 24 (Python's 25 // (25 / 24) is
    # 23.0, a float-error artefact); 29.97 to 12 fps: 12; 30 to 12: stride 2.5, 30 / 2.5 = 12.
    assert opensora_clip_fps(25.0, 25 / 24) == 24
    assert opensora_clip_fps(29.97, 29.97 / 12) == 12
    assert opensora_clip_fps(30.0, 2.5) == 12
    assert fps_suffix("a cat", 15) == "a cat 15 FPS."
    assert fps_suffix("", 15) == ""  # unconditional stays unconditional
    row = {"fps": 60.0}
    assert apply_caption_rules("a dog", row, fps_suffix_on=True, stride=3) == "a dog 20 FPS."
    assert apply_caption_rules("a dog", row) == "a dog"
    assert apply_caption_rules("a dog", {"fps": 0.0, "is_image": True}, fps_suffix_on=True) == "a dog"


@pytest.mark.parametrize(
    "score, expected",
    [
        (4.25, "t This video has a low aesthetic quality."),  # <= 4.25 is low
        (4.26, "t"),
        (5.74, "t"),
        (5.75, "t This video has a high aesthetic quality."),  # >= 5.75 is high
        (None, "t"),
    ],
)
def test_aesthetic_thresholds(score, expected):
    assert add_aesthetic("t", score, mode="fixed") == expected


def test_aesthetic_images_random_and_errors():
    assert add_aesthetic("t", 7.0, is_image=True) == "t This image has a high aesthetic quality."
    assert add_aesthetic("t", 2.0, is_image=True) == "t This image has a low aesthetic quality."
    assert add_aesthetic("t", 7.0, mode="off") == "t"
    assert add_aesthetic("", 7.0) == ""
    # random: a phrase of the list, before or after, a pure function of (seed, index, epoch).
    texts = [add_aesthetic("t", 7.0, mode="random", draw=(0, i, 0)) for i in range(60)]
    assert texts == [add_aesthetic("t", 7.0, mode="random", draw=(0, i, 0)) for i in range(60)]
    after = [x[2:] for x in texts if x.startswith("t ")]
    before = [x[:-2] for x in texts if x.endswith(" t")]
    assert after and before and len(after) + len(before) == 60
    assert set(after + before) <= set(HIGH_VIDEO) and len(set(after + before)) > 3
    low = add_aesthetic("t", 1.0, mode="random", draw=(0, 0, 0))
    assert any(low in (f"{p} t", f"t {p}") for p in LOW_VIDEO)
    with pytest.raises(CaptionError):
        add_aesthetic("t", 7.0, mode="loud")
    with pytest.raises(CaptionError, match="needs draw"):
        add_aesthetic("t", 7.0, mode="random")
    # Both rules: the aesthetic phrase, then the fps suffix.
    row = {"fps": 24.0, "aesthetic": 6.0}
    assert (
        apply_caption_rules("a cat", row, aesthetic="fixed", fps_suffix_on=True)
        == "a cat This video has a high aesthetic quality. 24 FPS."
    )
