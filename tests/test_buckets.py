"""Bucket policies against hand-computed values from the seeds' rules (SEED_FACTS.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from frameloom.config import load_config
from frameloom.data.buckets import (
    REASON_CODE,
    STREAM_OPENSORA,
    BucketError,
    Columns,
    aspect_ratio_sizes,
    build_policy,
    closest_ratio,
    columns_from_table,
    num_pixels,
    opensora_stride,
    plan_valid_frames,
    ratio_of,
    resolution_sizes,
    stream_key,
    uniform,
)
from frameloom.data.video import ClipSpec


def cols(rows: list[tuple], images: list[bool] | None = None) -> Columns:
    """Columns from (height, width, frames, fps) tuples."""
    h, w, t, fps = (np.array(x) for x in zip(*rows))
    return Columns(
        frames=t.astype(np.int32),
        height=h.astype(np.int32),
        width=w.astype(np.int32),
        fps=fps.astype(np.float64),
        is_image=np.array(images if images is not None else [False] * len(rows)),
    )


def config(*overrides: str):
    return load_config(None, list(overrides))


def names(policy, assignment) -> list[str | None]:
    return [policy.table.names[b] if b >= 0 else None for b in assignment.bucket]


def reasons(assignment) -> list[str]:
    from frameloom.data.buckets import REASONS

    return [REASONS[r] for r in assignment.reason]


# ----------------------------------------------------------------------------- Open-Sora sizes


def test_resolution_names():
    assert num_pixels("256px") == 256 * 256 == 65536
    assert num_pixels("768px") == 589824
    assert num_pixels("720p") == 921600  # int(720 * 720 / 9 * 16): a 16:9 frame 720 high, 1280 x 720
    assert num_pixels("360p") == 230400  # 640 x 360
    with pytest.raises(BucketError, match="unknown resolution"):
        num_pixels("720")


def test_aspect_table_256px():
    # P = 65536. Each "W:H" gives w = int(sqrt(P * W/H) // 16) * 16, h = int((P / w) // 16) * 16, then one
    # of (h -+ 16, w), (h, w -+ 16) if it is closer to P (tried in order against the best so far).
    # 1:1:   w = 256, h = 256, exact.
    # 2.39:1 w = sqrt(156631.04) = 395.8 -> 384, h = 170.7 -> 160: 61440 (diff 4096);
    #        (176, 384) = 67584 (2048) better; (160, 400) = 64000 (1536) better still -> (160, 400).
    # 2:1    w = sqrt(131072) = 362.0 -> 352, h = 186.2 -> 176: 61952 (3584); (192, 352) = 67584 (2048);
    #        (176, 368) = 64768 (768) -> (176, 368).
    # 3:2    w = sqrt(98304) = 313.5 -> 304, h = 215.6 -> 208: 63232 (2304); (208, 320) = 66560 (1024).
    # 4:3    w = sqrt(87381.3) = 295.6 -> 288, h = 227.6 -> 224: 64512 (1024); no neighbour closer.
    # 16:9   w = sqrt(116508.4) = 341.3 -> 336, h = 195.0 -> 192: (192, 336), 64512.
    # 1.85:1 w = sqrt(121241.6) = 348.2 -> 336, h -> 192: (192, 336) again, a duplicate -> dropped;
    # 5:8    w = sqrt(40960) = 202.4 -> 192, h = 341.3 -> 336: (336, 192) = 9:16's size -> dropped.
    # Mirrors "H:W" -> (w, h) are appended (16:9 <-> 9:16 overwrite each other in place).
    sizes = aspect_ratio_sizes(65536)
    assert list(sizes) == [
        "2.39:1",
        "2:1",
        "16:9",
        "9:16",
        "3:2",
        "4:3",
        "1:1",
        "1:2.39",
        "1:2",
        "2:3",
        "3:4",
    ]
    assert sizes["1:1"] == (256, 256)
    assert sizes["2.39:1"] == (160, 400) and sizes["1:2.39"] == (400, 160)
    assert sizes["2:1"] == (176, 368)
    assert sizes["3:2"] == (208, 320) and sizes["2:3"] == (320, 208)
    assert sizes["4:3"] == (224, 288)
    assert sizes["16:9"] == (192, 336) and sizes["9:16"] == (336, 192)
    assert resolution_sizes("256px") == (65536, sizes)
    # "_max": the largest area, 3:2's 208 x 320 = 66560 (1:1 has 65536, 2:1 64768).
    assert resolution_sizes("256px_max") == (65536, {"3:2": (208, 320)})
    assert resolution_sizes("256px_ar4:3") == (65536, {"4:3": (224, 288)})


def test_aspect_table_768px():
    # P = 589824 = 768^2.
    # 16:9   w = sqrt(1048576) = 1024, h = 576 exact; 1:1 -> 768 x 768.
    # 2.39:1 w = sqrt(1409679.4) = 1187.3 -> 1184, h = 498.2 -> 496: 587264 (2560); neighbours
    #        (512, 1184) 606208, (496, 1200) 595200 (5376): none closer -> (496, 1184).
    # 1.85:1 w = sqrt(1091174.4) = 1044.6 -> 1040, h = 567.1 -> 560: 582400 (7424); (560, 1056) = 591360
    #        (1536) -> (560, 1056). Not a duplicate at this size, so 15 entries in all.
    # 5:8    w = sqrt(368640) = 607.2 -> 592, h = 996.3 -> 992: 587264 (2560) -> (992, 592); mirror 8:5.
    sizes = aspect_ratio_sizes(589824)
    assert len(sizes) == 15
    assert sizes["16:9"] == (576, 1024) and sizes["9:16"] == (1024, 576)
    assert sizes["1:1"] == (768, 768)
    assert sizes["2.39:1"] == (496, 1184)
    assert sizes["1.85:1"] == (560, 1056) and sizes["1:1.85"] == (1056, 560)
    assert sizes["5:8"] == (992, 592) and sizes["8:5"] == (592, 992)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes.values())


def test_opensora_stride():
    # ceil(fps / fps_max) from fps_max up, 1 below it and for unknown fps (Open-Sora map_target_fps).
    fps = np.array([60.0, 48.0, 30.0, 24.0, 23.976, np.nan, 0.0])
    assert opensora_stride(fps, 24).tolist() == [3, 2, 2, 1, 1, 1, 1]
    assert opensora_stride(fps, None).tolist() == [1] * 7


# ----------------------------------------------------------------------------- Open-Sora policy

CONFIG = (
    "data.bucket=opensora",
    "data.fps_max=24",
    "data.bucket_config={768px: {1: [1.0, 1], 129: [1.0, 1], 65: [1.0, 2]}, "
    "256px: {1: [1.0, 8], 129: [1.0, 4], 33: [1.0, 8]}}",
)


def test_opensora_which_bucket():
    rows = [
        (1080, 1920, 300, 60.0),  # stride ceil(60/24) = 3 -> T = 100: 768px (area >= 0.8 P), 129 > 100, 65
        (480, 640, 300, 30.0),  # stride 2 -> T = 150; area 307200 < 0.8 * 589824 -> 256px; 129; h/w 0.75
        (720, 1280, 40, 24.0),  # T = 40: 768px has no count <= 40 (1 is for images) -> 256px, 33
        (1024, 1024, 1, 0.0),  # an image: 768px, frame count 1
        (200, 200, 300, 24.0),  # area 40000 < 0.8 * 65536 = 52428.8: too small everywhere
        (720, 1280, 20, 24.0),  # 20 frames: shorter than every count
        (192, 272, 100, 24.0),  # 52224 < 52428.8: too small
        (208, 256, 100, 24.0),  # 53248 >= 52428.8: 256px, 33; h/w 0.8125 -> nearest ratio 4:3 (0.75)
        (1080, 1920, 300, 48.0),  # stride 2 -> T = 150: 768px, 129
    ]
    policy = build_policy(
        config(*CONFIG), cols(rows, [False, False, False, True, False, False, False, False, False])
    )
    a = policy.assign(0)
    assert names(policy, a) == [
        "768px/65/16:9",
        "256px/129/4:3",
        "256px/33/16:9",
        "768px/1/1:1",
        None,
        None,
        None,
        "256px/33/4:3",
        "768px/129/16:9",
    ]
    assert reasons(a)[4:7] == ["too_small", "too_short", "too_small"]
    k = policy.table.names.index("768px/65/16:9")
    assert policy.table.shape(k) == (65, 576, 1024) and policy.table.batch_size[k] == 2


def test_opensora_rejection_drops_to_lower_resolution():
    # p = 0 at 768px: never accepted there (a draw u <= 0 has probability 2^-53), so it drops to 256px.
    cfg = config(
        "data.bucket=opensora",
        "data.bucket_config={768px: {65: [0.0, 1]}, 256px: {65: [1.0, 1]}}",
    )
    policy = build_policy(cfg, cols([(1080, 1920, 100, 24.0)] * 5))
    assert names(policy, policy.assign(3)) == ["256px/65/16:9"] * 5


def test_opensora_keep_probabilities_over_epochs():
    # 400 rows x 50 epochs = 20000 decisions per case; 5 standard deviations as bounds.
    rows = cols([(1080, 1920, 200, 24.0)] * 400)
    n = 400 * 50

    def frequencies(bucket_config: str) -> dict[str, float]:
        policy = build_policy(config("data.bucket=opensora", f"data.bucket_config={bucket_config}"), rows)
        out: dict[str, float] = {}
        for epoch in range(50):
            for name in names(policy, policy.assign(epoch)):
                out[str(name)] = out.get(str(name), 0) + 1 / n
        return out

    def close(f: float, p: float) -> bool:
        return abs(f - p) < 5 * np.sqrt(p * (1 - p) / n)

    # p = 0.3 at 768px, else 256px (p = 1).
    f = frequencies("{768px: {65: [0.3, 1]}, 256px: {65: [1.0, 1]}}")
    assert close(f["768px/65/16:9"], 0.3) and close(f["256px/65/16:9"], 0.7)
    # Chained rejections: 768px 0.5; then 256px 0.5 of the rest = 0.25; left out 0.25 ("rejected").
    f = frequencies("{768px: {129: [0.5, 1]}, 256px: {129: [0.5, 1]}}")
    assert close(f["768px/129/16:9"], 0.5) and close(f["256px/129/16:9"], 0.25) and close(f["None"], 0.25)
    # (p, q): with q = 0.4 move on from 129 to 65; p = 1 at both: 0.6 at 129, 0.4 at 65.
    f = frequencies("{768px: {129: [[1.0, 0.4], 1], 65: [1.0, 1]}}")
    assert close(f["768px/129/16:9"], 0.6) and close(f["768px/65/16:9"], 0.4)
    # (p, q) with p < 1: stay at 129 (0.6) then keep (0.5): 0.3; move on (0.4), keep at 65 (0.5): 0.2.
    f = frequencies("{768px: {129: [[0.5, 0.4], 1], 65: [0.5, 1]}}")
    assert close(f["768px/129/16:9"], 0.3) and close(f["768px/65/16:9"], 0.2) and close(f["None"], 0.5)


def test_opensora_decisions_are_pure_and_vary_by_epoch():
    rows = cols([(1080, 1920, 200, 24.0)] * 1000)
    cfg_args = ("data.bucket=opensora", "data.bucket_config={768px: {65: [0.5, 1]}, 256px: {65: [1.0, 1]}}")
    cfg = config(*cfg_args)
    a, b = build_policy(cfg, rows), build_policy(cfg, rows)
    assert np.array_equal(a.assign(2).bucket, b.assign(2).bucket)
    assert not np.array_equal(a.assign(2).bucket, a.assign(3).bucket)
    other = build_policy(config("seed=1", *cfg_args), rows)
    assert not np.array_equal(a.assign(2).bucket, other.assign(2).bucket)
    # Open-Sora seeds with seed + epoch + index, so row i at epoch e+1 repeats row i+1 at epoch e; the hash
    # does not: agreement between the two is at chance level (0.5), not 1.
    e2, e3 = a.assign(2).bucket, a.assign(3).bucket
    assert 0.4 < float(np.mean(e3[:-1] == e2[1:])) < 0.6


def reference_bucket(policy, i: int, epoch: int) -> str | None:
    """Open-Sora 2.0's get_bucket_id for one row, line by line, with rng.random() replaced by the row's
    k-th hash draw: the vectorized policy must agree with it row for row."""
    c = policy.cols
    key = stream_key(policy.seed, epoch, STREAM_OPENSORA)
    draws = iter(uniform(key, np.full(64, i), np.arange(64)))
    T = 1 if c.is_image[i] else int(c.frames[i]) // int(opensora_stride(c.fps[i], policy.fps_max))
    H, W = int(c.height[i]), int(c.width[i])
    for res, pixels, sizes, entries in policy.resolutions:
        if H * W < pixels * 0.8:
            continue
        probs = {t: (p if q is None else (p, q)) for t, p, q, _ in entries}
        if T == 1:
            if 1 in probs and next(draws) < probs[1]:
                return f"{res}/1/{min(sizes, key=lambda k: abs(H / W - ratio_of(k)))}"
            continue
        for t, prob in probs.items():
            if T >= t and t != 1:
                if isinstance(prob, tuple):
                    next_hw_prob, next_t_prob = prob
                    if next_t_prob >= 1 or next(draws) <= next_t_prob:
                        continue
                else:
                    next_hw_prob = prob
                if next_hw_prob >= 1 or next(draws) <= next_hw_prob:
                    return f"{res}/{t}/{min(sizes, key=lambda k: abs(H / W - ratio_of(k)))}"
                break
    return None


def test_opensora_matches_a_row_by_row_reference():
    rng = np.random.default_rng(1)
    n = 300
    h = rng.integers(100, 1200, n)
    w = rng.integers(100, 1200, n)
    rows = cols(
        list(zip(h, w, rng.integers(1, 300, n), rng.choice([24.0, 30.0, 60.0, np.nan], n))),
        list(rng.random(n) < 0.1),
    )
    cfg = config(
        "data.bucket=opensora",
        "data.fps_max=24",
        "data.bucket_config={256px: {1: [0.8, 4], 33: [0.9, 4], 65: [[0.7, 0.4], 2], 97: [[0.6, 1.0], 2]}, "
        "512px: {1: [0.5, 2], 17: [0.5, 2], 65: [[0.5, 0.5], 1]}, 360p: {33: [0.3, 1]}}",
    )
    policy = build_policy(cfg, rows)
    for epoch in range(3):
        got = names(policy, policy.assign(epoch))
        assert got == [reference_bucket(policy, i, epoch) for i in range(n)]


def test_opensora_buckets_of_a_dozen_rows_by_hand():
    # Expected values worked out by hand from Open-Sora 2.0's rules (not from frameloom's tables): p = 1
    # everywhere (no draws); resolutions largest first, skipped while h * w < 0.8 P (512px: 209715.2, 256px:
    # 52428.8); T = frames // ceil(fps / 24) (unknown fps: stride 1); a video takes the largest count <= T
    # (not 1), an image count 1; the ratio bucket is the nearest h / w.
    cfg = config(
        "data.bucket=opensora",
        "data.fps_max=24",
        "data.bucket_config={256px: {1: [1.0, 4], 33: [1.0, 2], 65: [1.0, 1]}, 512px: {33: [1.0, 1]}}",
    )
    rows = [  # (h, w, frames, fps, image) -> bucket
        ((720, 1280, 100, 24.0, False), "512px/33/16:9"),
        ((720, 1280, 20, 24.0, False), None),  # 20 < 33 at 512px; 256px has no video count <= 20
        ((720, 1280, 40, 24.0, False), "512px/33/16:9"),
        ((256, 256, 70, 24.0, False), "256px/65/1:1"),  # 65536 < 209715: 256px; 65 <= 70
        ((256, 256, 50, 24.0, False), "256px/33/1:1"),
        ((256, 256, 70, 60.0, False), None),  # stride ceil(60 / 24) = 3: T = 23
        ((256, 256, 140, 60.0, False), "256px/33/1:1"),  # T = 46
        ((180, 320, 70, 24.0, False), "256px/65/16:9"),  # h / w = 0.5625 = 9 / 16
        ((300, 300, 1, 0.0, True), "256px/1/1:1"),  # an image: count 1
        ((1000, 1000, 1, 0.0, True), "256px/1/1:1"),  # 512px has no count 1: on to 256px
        ((100, 100, 70, 24.0, False), None),  # 10000 < 52428.8: too small for any resolution
        ((320, 180, 70, 24.0, False), "256px/65/9:16"),  # h / w = 1.78
        ((256, 256, 70, float("nan"), False), "256px/65/1:1"),  # unknown fps: every frame
        ((480, 640, 100, 24.0, False), "512px/33/4:3"),  # h / w = 0.75
    ]
    data = cols([r[:4] for r, _ in rows], [r[4] for r, _ in rows])
    policy = build_policy(cfg, data)
    assert names(policy, policy.assign(0)) == [want for _, want in rows]
    # Sizes by hand: w = int(sqrt(P r) // 16) * 16, h = int((P / w) // 16) * 16, then +-16 steps toward P.
    # 512px 16:9: w = 672, h = 384 (258048, 4096 short); (384, 688) = 264192 is 2048 off: taken.
    # 512px 4:3: (448, 576) is 4096 short; (448, 592) = 265216 is 3072 off: taken. 256px 16:9: (192, 336).
    shape = {policy.table.names[k]: policy.table.shape(k) for k in range(len(policy.table))}
    assert shape["512px/33/16:9"] == (33, 384, 688)
    assert shape["512px/33/4:3"] == (33, 448, 592)
    assert shape["256px/65/16:9"] == (65, 192, 336) and shape["256px/65/1:1"] == (65, 256, 256)


def test_closest_ratio_matches_min_over_keys():
    _, sizes = resolution_sizes("768px")
    ratios = [ratio_of(k) for k in sizes]
    midpoints = [(a + b) / 2 for a, b in zip(sorted(ratios), sorted(ratios)[1:])]  # exact ties
    aspect = np.concatenate([np.random.default_rng(0).uniform(0.2, 3, 2000), ratios, midpoints])
    expected = [min(range(len(ratios)), key=lambda k: abs(a - ratios[k])) for a in aspect]
    assert closest_ratio(aspect, ratios).tolist() == expected


def test_uniform_is_uniform_and_pure():
    u = uniform(stream_key(0, 0, 1), np.arange(100_000))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(np.mean(u < 0.1) - 0.1) < 0.005
    assert np.array_equal(u[[5, 7]], uniform(stream_key(0, 0, 1), np.array([5, 7])))
    assert not np.array_equal(u[:10], uniform(stream_key(0, 0, 1), np.arange(10), 1))


def test_opensora_config_errors():
    with pytest.raises(BucketError, match="bucket_config"):
        build_policy(config("data.bucket=opensora"), cols([(10, 10, 10, 24.0)]))
    with pytest.raises(BucketError, match="batch size"):
        build_policy(
            config("data.bucket=opensora", "data.bucket_config={256px: {33: [1.0, 0]}}"),
            cols([(1, 1, 1, 1.0)]),
        )
    with pytest.raises(BucketError, match="images"):
        build_policy(
            config("data.bucket=opensora", "data.bucket_config={256px: {1: [[1.0, 0.5], 4]}}"),
            cols([(1, 1, 1, 1.0)]),
        )
    with pytest.raises(BucketError, match="data.bucket must be one of"):
        build_policy(config("data.bucket=nope"), cols([(1, 1, 1, 1.0)]))


def test_clip_spec_at_bucket_shape():
    policy = build_policy(config(*CONFIG), cols([(1080, 1920, 300, 60.0)]))
    base = ClipSpec(num_frames=16, height=32, width=32, fps_max=24)
    k = int(policy.assign(0).bucket[0])
    spec = policy.clip_spec(base, 60.0, k)
    assert (spec.num_frames, spec.height, spec.width, spec.fps_max) == (65, 576, 1024, 24)


def test_columns_from_table_cut_and_images():
    table = pa.table(
        {
            "path": ["a.mp4", "b.png", "c.mp4"],
            "num_frames": [100, 1, 50],
            "height": [10, 20, 30],
            "width": [10, 20, 30],
            "fps": [24.0, None, 30.0],
            "cut_start": [10, None, None],
            "cut_end": [60, None, None],
        }
    )
    c = columns_from_table(table)
    assert c.frames.tolist() == [50, 1, 50]  # the cut [10, 60) holds 50 frames
    assert c.is_image.tolist() == [False, True, False]  # from the suffix when there is no is_image column
    assert np.isnan(c.fps[1])


# ----------------------------------------------------------------------------- Open-Sora-Plan


def test_plan_valid_frames():
    # Largest y <= n with (y - 1) % 4 == 0 and latent (y - 1) // 4 + 1 divisible by sp; none below 29.
    n = np.array([28, 29, 32, 33, 35, 49, 50, 77, 80, 93])
    assert plan_valid_frames(n).tolist() == [-1, 29, 29, 33, 33, 49, 49, 77, 77, 93]
    # sp 8: latent lengths 8, 16, 24 -> 29, 61, 93 frames. 80 -> latent 20 -> 16 -> 61.
    assert plan_valid_frames(np.array([28, 40, 60, 61, 80, 93]), 4, 8).tolist() == [-1, 29, 29, 61, 61, 93]


def plan_assign(cfg, rows, images=None):
    """Each row 4 times (Open-Sora-Plan drops shapes with < 4 x batch samples; batch 1 here); the first copies."""
    n = len(rows)
    policy = build_policy(cfg, cols(rows * 4, (images or [False] * n) * 4))
    a = policy.assign(0)
    return policy, a, names(policy, a)[:n], reasons(a)[:n]


PLAN = (
    "data.bucket=opensora_plan",
    "data.max_hxw=230400",
    "data.num_frames=93",
    "data.target_fps=24",
    "train.batch_size=1",
    "data.megabatch=1",
    "data.drop_short_ratio=0.0",
)


def test_plan_sizes():
    # max_hxw 230400 (= 480 x 480), min_hxw 57600, stride 32.
    rows = [
        (
            720,
            1280,
            100,
            24.0,
        ),  # area 921600 -> scale sqrt(1/4) = 0.5 -> 360 x 640 -> 352 x 640 (360 // 32 = 11)
        (1280, 1280, 100, 24.0),  # scale sqrt(230400 / 1638400) = 0.375 -> 480 x 480 -> 480 x 480
        (240, 320, 100, 24.0),  # under max_hxw: kept, cropped to 224 x 320
        (200, 300, 100, 24.0),  # 192 x 288 = 55296 < 57600: too small
        (300, 1000, 100, 24.0),  # scale 0.8764 -> 262 x 876 -> 256 x 864; h/w 0.296 < 1/2: aspect
    ]
    policy, a, got, why = plan_assign(config(*PLAN, "data.min_hxw=null"), rows)
    assert got == ["93x352x640", "93x480x480", "93x224x320", None, None]
    assert why[3:] == ["too_small", "aspect"]
    assert a is policy.assign(5)  # decided once, not per epoch


def test_plan_force_resolution():
    # Target 480 x 640 (aspect 0.75): h / w kept within [0.375, 1.5].
    cfg = config(*PLAN, "data.force_resolution=true", "data.max_height=480", "data.max_width=640")
    rows = [(1080, 1920, 100, 24.0), (300, 1000, 100, 24.0), (1000, 600, 100, 24.0)]
    _, _, got, why = plan_assign(cfg, rows)
    assert got == ["93x480x640", None, None]  # 0.3 < 0.375; 1.667 > 1.5
    assert why[1:] == ["aspect", "aspect"]


def test_plan_frames():
    # num_frames 93 at train fps 24 (stride fps / 24; 1 within 0.1 fps), sp 1.
    rows = [
        (720, 1280, 100, 24.0),  # n = 100 -> crop to 93 -> 93
        (720, 1280, 100, 48.0),  # stride 2: n = ceil(100 / 2) = 50 (short, drop ratio 0) -> 49
        (720, 1280, 100, 30.0),  # stride 1.25: n = 80 -> 77
        (720, 1280, 28, 24.0),  # n = 28 < 29: too short
        (720, 1280, 466, 24.0),  # 466 > 5 x 93 x 24 / 24 = 465: too long
        (720, 1280, 465, 24.0),  # 465: not too long -> 93
        (720, 1280, 100, 23.95),  # |23.95 - 24| < 0.1: stride 1 -> 93
        (720, 1280, 1, 0.0),  # an image: 1 frame
    ]
    policy, a, _, why = plan_assign(config(*PLAN), rows, [False] * 7 + [True])
    frames = [policy.table.shape(b)[0] if b >= 0 else None for b in a.bucket[: len(rows)]]
    assert frames == [93, 49, 77, None, None, 93, 93, 1]
    assert why[3:5] == ["too_short", "too_long"]
    k = int(a.bucket[2])
    assert policy.clip_spec(ClipSpec(num_frames=93, target_fps=24), 30.0, k).frame_stride == 1.25
    # sp_size 8: 100 frames -> 93 (latent 24); 80 frames at 24 fps -> latent 20 -> 16 -> 61.
    policy, a, _, _ = plan_assign(
        config(*PLAN, "parallel.sp_size=8"), [(720, 1280, 100, 24.0), (720, 1280, 80, 24.0)]
    )
    assert [policy.table.shape(b)[0] for b in a.bucket[:2]] == [93, 61]


def test_plan_drop_short_ratio_is_static():
    # 4000 short videos (50 frames < 93), drop_short_ratio 0.5: about half dropped, the same rows every epoch.
    rows = cols([(720, 1280, 50, 24.0)] * 4000)
    policy = build_policy(config(*PLAN[:-1], "data.drop_short_ratio=0.5"), rows)
    a = policy.assign(0)
    dropped = np.mean(a.reason == REASON_CODE["too_short"])
    assert abs(dropped - 0.5) < 5 * np.sqrt(0.25 / 4000)
    assert np.array_equal(a.bucket, policy.assign(7).bucket)


def test_plan_minority_filter():
    # batch 2 x grad_accum 1 x megabatch 1 -> shapes with fewer than 4 x 2 = 8 samples are dropped.
    rows = cols([(720, 1280, 100, 24.0)] * 8 + [(480, 480, 100, 24.0)] * 7)
    policy = build_policy(config(*PLAN, "train.batch_size=2"), rows)
    a = policy.assign(0)
    assert policy.table.names == ("93x352x640",)
    assert reasons(a) == ["kept"] * 8 + ["minority"] * 7


def test_plan_needs_max_hxw():
    with pytest.raises(BucketError, match="max_hxw"):
        build_policy(config("data.bucket=opensora_plan"), cols([(10, 10, 10, 24.0)]))


# ----------------------------------------------------------------------------- fixed, temporal


def test_fixed():
    # CogVideoX: 49 x 480 x 720. 49 frames at stride 1 fit; 48 do not. At 16 fps with target 8 (stride 2)
    # frame i is floor(2 i), so 49 frames need indices 0..96: 97 source frames.
    cfg = config("data.bucket=fixed", "data.num_frames=49", "data.height=480", "data.width=720")
    policy = build_policy(
        cfg, cols([(1080, 1920, 49, 8.0), (1080, 1920, 48, 8.0), (100, 100, 1, 0.0)], [False, False, True])
    )
    a = policy.assign(0)
    assert names(policy, a) == ["49x480x720", None, "49x480x720"] and reasons(a)[1] == "too_short"
    cfg = config("data.bucket=fixed", "data.num_frames=49", "data.target_fps=8")
    policy = build_policy(cfg, cols([(64, 64, 97, 16.0), (64, 64, 96, 16.0), (64, 64, 200, float("nan"))]))
    assert reasons(policy.assign(0)) == ["kept", "too_short", "no_fps"]
    spec = policy.clip_spec(ClipSpec(num_frames=49, target_fps=8, frame_policy="8n+1"), 16.0, 0)
    assert (spec.num_frames, spec.target_fps, spec.frame_policy) == (49, 8, None)


def test_temporal():
    # Pyramid Flow: c = 8, num_frames 121 -> at most 16 latent frames. Latent (n - 1) // 8 + 1.
    args = ("data.bucket=temporal", "data.num_frames=121", "data.height=64", "data.width=96")
    cfg = config(*args)
    rows = cols([(64, 96, 121, 24.0), (64, 96, 500, 24.0), (64, 96, 60, 24.0), (64, 96, 8, 24.0)])
    policy = build_policy(cfg, rows)
    assert len(policy.table) == 16 and policy.table.shape(15) == (121, 64, 96)
    a = policy.assign(0)
    # 121 -> 16 -> 121 frames; 500 -> capped at 16; 60 -> 59 // 8 + 1 = 8 -> 57 frames; 8 -> 1 -> 1 frame.
    assert names(policy, a) == ["121x64x96", "121x64x96", "57x64x96", "1x64x96"]
    # video_sync_group 4: latent 16, 16, 8 stay; 1 -> 0: too short. Buckets 4, 8, 12, 16 latent frames.
    policy = build_policy(config(*args, "data.latent_multiple=4"), rows)
    assert policy.table.names == ("25x64x96", "57x64x96", "89x64x96", "121x64x96")
    a = policy.assign(0)
    assert names(policy, a) == ["121x64x96", "121x64x96", "57x64x96", None]
    assert reasons(a)[3] == "too_short"


# ----------------------------------------------------------------------------- reachable (row, bucket) pairs


def reachable_names(policy) -> dict[int, set[str]]:
    rows, buckets = policy.reachable()
    out: dict[int, set[str]] = {}
    for r, b in zip(rows.tolist(), buckets.tolist()):
        out.setdefault(r, set()).add(policy.table.names[b])
    return out


def test_opensora_reachable_by_hand():
    # 1080 x 1920 at 24 fps, T = 200 (768px: area >= 0.8 P; h/w 0.5625 -> 16:9).
    row = [(1080, 1920, 200, 24.0)]
    # p = 1, no q: the first count <= 200 at 768px, always; nothing else.
    policy = build_policy(config(*CONFIG), cols(row))
    assert reachable_names(policy) == {0: {"768px/129/16:9"}}
    # q = 0.4 moves on from 129 to 65 (p = 1 at both): both; p = 0.5 at 65 can reject -> 256px's 129 too.
    cfg = config(
        "data.bucket=opensora",
        "data.bucket_config={768px: {129: [[1.0, 0.4], 1], 65: [0.5, 1]}, 256px: {129: [1.0, 1]}}",
    )
    assert reachable_names(build_policy(cfg, cols(row))) == {
        0: {"768px/129/16:9", "768px/65/16:9", "256px/129/16:9"}
    }
    # q = 1: always moves on (129 never decided); p = 0: never accepted (drops to 256px); a 40-frame video
    # has no count <= 40 at 768px and none at 256px: no pair at all.
    cfg = config(
        "data.bucket=opensora",
        "data.bucket_config={768px: {129: [[1.0, 1.0], 1], 65: [0.0, 1]}, 256px: {65: [1.0, 1]}}",
    )
    policy = build_policy(cfg, cols([*row, (1080, 1920, 40, 24.0)]))
    assert reachable_names(policy) == {0: {"256px/65/16:9"}}


def test_opensora_reachable_is_the_union_of_every_epochs_assignment():
    # 300 random rows (images, unknown fps, tiny sizes) under probabilities 0, 1 and between, with (p, q)
    # pairs: every pair some epoch assigns is reachable, and over 400 epochs every reachable pair turns up
    # (the least likely path here has probability 0.3 * 0.4 = 0.12 per epoch).
    rng = np.random.default_rng(0)
    n = 300
    c = Columns(
        frames=rng.integers(0, 80, n).astype(np.int32),
        height=rng.integers(8, 400, n).astype(np.int32),
        width=rng.integers(0, 400, n).astype(np.int32),
        fps=rng.choice([24.0, 30.0, 60.0, np.nan], n),
        is_image=rng.random(n) < 0.1,
    )
    c.frames[c.is_image] = 1
    cfg = config(
        "data.bucket=opensora",
        "data.fps_max=24",
        "data.bucket_config={256px: {1: [0.5, 4], 17: [[0.7, 0.4], 2], 9: [1.0, 2], 33: [0.0, 1]},"
        " 144p: {1: [1.0, 4], 17: [[1.0, 1.0], 2], 5: [0.6, 2]}, 64px: {5: [1.0, 3], 9: [[0.3, 0.0], 2]}}",
    )
    policy = build_policy(cfg, c)
    rows, buckets = policy.reachable()
    reach = set(zip(rows.tolist(), buckets.tolist()))
    assert len(reach) == len(rows)  # no pair twice
    assert list(zip(rows.tolist(), buckets.tolist())) == sorted(reach)
    seen = set()
    for epoch in range(400):
        b = policy.assign(epoch).bucket
        kept = np.flatnonzero(b >= 0)
        seen |= set(zip(kept.tolist(), b[kept].tolist()))
    assert seen == reach
    assert len({r for r, _ in reach}) < len(reach)  # some rows reach several buckets


def test_static_policies_reach_their_one_bucket():
    cfg = config("data.bucket=temporal", "data.num_frames=121", "data.height=64", "data.width=96")
    policy = build_policy(cfg, cols([(64, 96, 121, 24.0), (64, 96, 8, 24.0), (64, 96, 60, 24.0)]))
    rows, buckets = policy.reachable()
    assert rows.tolist() == [0, 1, 2]
    assert [policy.table.names[b] for b in buckets] == ["121x64x96", "1x64x96", "57x64x96"]
