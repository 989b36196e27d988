"""Frame choice (hand-computed index lists) and seek-based decoding of real files."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from frameloom.data.probe import probe_file
from frameloom.data.video import (
    ClipError,
    ClipSpec,
    DecodeError,
    decode_clip,
    frame_indices,
    read_frames,
    resize_cover,
)
from frameloom.errors import FrameloomError
from media import (
    decode_all,
    frame_index_of,
    has_encoder,
    index_frames,
    split_frames,
    write_image,
    write_video,
)

# ------------------------------------------------------------------------------------------ frame_indices


@pytest.mark.parametrize(
    "num_source, fps, spec, expected",
    [
        (100, 30.0, ClipSpec(4), [0, 1, 2, 3]),
        # 30 fps -> 12 fps is a stride of 2.5 source frames; from frame 5, rounding down.
        (100, 30.0, ClipSpec(8, target_fps=12, start_frame=5), [5, 7, 10, 12, 15, 17, 20, 22]),
        (100, 30.0, ClipSpec(4, frame_stride=3, start_frame=2), [2, 5, 8, 11]),
        (100, 30.0, ClipSpec(5, frame_stride=1.5), [0, 1, 3, 4, 6]),
        # 10 fps -> 25 fps (stride 0.4) repeats frames.
        (100, 10.0, ClipSpec(6, target_fps=25), [0, 0, 0, 1, 1, 2]),
        # 24 fps -> 8 fps: stride 3; the last index 9 fits exactly in 10 frames.
        (10, 24.0, ClipSpec(4, target_fps=8), [0, 3, 6, 9]),
    ],
)
def test_frame_indices_by_hand(num_source, fps, spec, expected):
    assert frame_indices(num_source, fps, spec) == expected


def test_frame_indices_absorbs_float_error():
    # 45 * 1.4 is 62.99999999999999 in floating point; the clip means source frame 63.
    assert frame_indices(100, 30.0, ClipSpec(46, frame_stride=1.4))[45] == 63


@pytest.mark.parametrize(
    "num_source, fps, spec",
    [
        (9, 24.0, ClipSpec(4, target_fps=8)),  # needs frame 9 of 9
        (10, 24.0, ClipSpec(3, start_frame=8)),
        (100, 24.0, ClipSpec(4, frame_stride=2, target_fps=12)),  # both set
        (100, 0.0, ClipSpec(4, target_fps=12)),  # no source rate to convert from
        (100, 24.0, ClipSpec(0)),
        (100, 24.0, ClipSpec(2, frame_stride=0)),
    ],
)
def test_frame_indices_errors(num_source, fps, spec):
    with pytest.raises(ClipError) as info:
        frame_indices(num_source, fps, spec)
    assert isinstance(info.value, FrameloomError)


# ------------------------------------------------------------------------------------------------ decoding

SEEK_CASES = {
    "h264_mp4": ("s.mp4", dict(codec="libx264")),
    "h264_mkv": ("s.mkv", dict(codec="libx264")),
    "h264_mov": ("s.mov", dict(codec="libx264")),
    "mpeg4_avi": ("s.avi", dict(codec="mpeg4")),
    "mjpeg_avi": ("sj.avi", dict(codec="mjpeg")),
    "vp9_webm": ("s.webm", dict(codec="libvpx-vp9")),
    "h264_ts": ("s.ts", dict(codec="libx264")),  # no index: FFmpeg seeks by bisecting timestamps
    "flv": ("s.flv", dict(codec="flv")),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_media")
    files = {}
    for name, (filename, kwargs) in SEEK_CASES.items():
        if has_encoder(kwargs["codec"]):
            # Keyframe every 8 frames, so a seek to frame 30 really skips three GOPs.
            files[name] = write_video(root / filename, index_frames(40, 16, 16), fps=24, gop=8, **kwargs)
    files["split"] = write_video(root / "split.mp4", split_frames(6, 32, 64), fps=24, codec="libx264")
    return files


def _row(path) -> dict:
    return probe_file(path)


def _ids(video: torch.Tensor) -> list[int]:
    return [frame_index_of(video[:, t].numpy()) for t in range(video.shape[1])]


@pytest.mark.parametrize("name", list(SEEK_CASES))
def test_seek_returns_the_frames_a_full_decode_gives(clips, name):
    if name not in clips:
        pytest.skip(f"no {SEEK_CASES[name][1]['codec']} encoder in this PyAV build")
    path = clips[name]
    reference = decode_all(path)
    wanted = [30, 31, 33, 35]
    got = read_frames(path, wanted, fps=24.0)
    assert got.decoded < 30, "read_frames decoded from the start instead of seeking"
    for frame, index in zip(got.frames, wanted):
        assert np.array_equal(frame, reference[index])
        assert frame_index_of(frame) == index


def test_decode_clip_stride_shape_and_identity(clips):
    row = _row(clips["h264_mp4"])
    video = decode_clip(row, ClipSpec(8, frame_stride=2, start_frame=3))
    assert video.shape == (3, 8, 16, 16) and video.dtype == torch.uint8
    assert _ids(video) == [3, 5, 7, 9, 11, 13, 15, 17]


def test_decode_clip_target_fps(clips):
    row = _row(clips["mjpeg_avi"])  # 24 fps
    assert _ids(decode_clip(row, ClipSpec(5, target_fps=10, start_frame=1))) == [1, 3, 5, 8, 10]


def test_float_output_range_matches_uint8(clips):
    row = _row(clips["h264_mp4"])
    spec = ClipSpec(4, start_frame=20)
    as_uint8 = decode_clip(row, spec)
    as_float = decode_clip(row, spec, output="float")
    assert as_float.dtype == torch.float32 and as_float.shape == as_uint8.shape
    assert -1.0 <= float(as_float.min()) and float(as_float.max()) <= 1.0
    assert torch.allclose(as_float, as_uint8.float() / 127.5 - 1.0, atol=1e-6)


def test_relative_path_with_root(clips):
    row = _row(clips["h264_mp4"]) | {"path": clips["h264_mp4"].name}
    video = decode_clip(row, ClipSpec(2), root=clips["h264_mp4"].parent)
    assert _ids(video) == [0, 1]


def test_cut_range_offsets_and_bounds(clips):
    row = _row(clips["h264_mp4"]) | {"cut_start": 10, "cut_end": 20}
    assert _ids(decode_clip(row, ClipSpec(5, frame_stride=2))) == [10, 12, 14, 16, 18]
    with pytest.raises(DecodeError):
        decode_clip(row, ClipSpec(6, frame_stride=2))  # would need frame 20, outside the cut


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_variable_frame_rate_maps_by_timestamp(tmp_path, suffix):
    # Frames at 0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 1.2, 1.3, 2.0, 2.1 s. On a 10 fps grid, index i shows the last
    # frame whose time rounds to i or less: held frames repeat across the gaps.
    pts = [0, 1, 2, 5, 6, 7, 12, 13, 20, 21]
    codec = "mjpeg" if suffix == ".mkv" else "libx264"
    path = write_video(
        tmp_path / f"vfr{suffix}", index_frames(10, 16, 16), codec=codec, pts=pts, time_base=Fraction(1, 10)
    )
    row = {"path": str(path), "num_frames": 22, "fps": 10.0}
    expected = [0, 1, 2, 2, 2, 3, 4, 5, 5, 5, 5, 5, 6, 7, 7, 7, 7, 7, 7, 7, 8, 9]
    assert _ids(decode_clip(row, ClipSpec(22))) == expected
    # From frame 12 (a seek): the same mapping.
    assert _ids(decode_clip(row, ClipSpec(10, start_frame=12))) == expected[12:]


@pytest.mark.parametrize(
    "rotation, top, bottom",
    [(90, "red", "blue"), (270, "blue", "red")],
)
def test_rotation_gives_displayed_orientation(tmp_path, rotation, top, bottom):
    # Stored: 16 high x 32 wide, left half red, right half blue. Turned clockwise, the left edge goes up.
    path = write_video(tmp_path / "rot.mp4", split_frames(3, 16, 32), fps=10, rotation=rotation)
    video = decode_clip(probe_file(path), ClipSpec(2))
    assert video.shape == (3, 2, 32, 16)
    channel = {"red": 0, "blue": 2}
    assert video[channel[top], :, :12].float().mean() > 200
    assert video[channel[bottom], :, 20:].float().mean() > 200
    assert video[channel[bottom], :, :12].float().mean() < 50


def test_rotation_180_and_row_override(tmp_path):
    path = write_video(tmp_path / "r180.mp4", split_frames(3, 16, 32), fps=10, rotation=180)
    row = probe_file(path)
    turned = decode_clip(row, ClipSpec(1))
    assert turned[2, 0, :, :12].float().mean() > 200  # blue now on the left
    # A row's own rotation overrides the file's display matrix (0: use the pixels as stored).
    stored = decode_clip(row | {"rotation": 0}, ClipSpec(1))
    assert stored[0, 0, :, :12].float().mean() > 200


def test_crop_then_resize(clips):
    row = _row(clips["split"])  # 32 high x 64 wide, red | blue
    # Crop the red half only, then shrink: all red.
    red = decode_clip(row, ClipSpec(1, crop=(0, 32, 0, 32), height=16, width=16))
    assert red.shape == (3, 1, 16, 16)
    assert red[0].float().mean() > 200 and red[2].float().mean() < 50
    # Crop x 16..48, y 8..24 (16 x 32, red | blue), cover 8 x 8: scale 0.5 -> 8 x 16, center columns 4..12.
    mixed = decode_clip(row, ClipSpec(1, crop=(16, 48, 8, 24), height=8, width=8))
    assert mixed.shape == (3, 1, 8, 8)
    assert mixed[0, 0, :, :3].float().mean() > 200 and mixed[2, 0, :, 5:].float().mean() > 200


def test_resize_keeps_aspect_and_center_crops(clips):
    row = _row(clips["split"])
    square = decode_clip(row, ClipSpec(1, height=16, width=16))  # 32x64 -> 16x32 -> middle 16 columns
    assert square.shape == (3, 1, 16, 16)
    assert square[0, 0, :, :6].float().mean() > 200 and square[2, 0, :, 10:].float().mean() > 200
    only_height = decode_clip(row, ClipSpec(1, height=16))
    assert only_height.shape == (3, 1, 16, 32)
    assert decode_clip(row, ClipSpec(1)).shape == (3, 1, 32, 64)


def test_resize_cover_upscales_to_cover():
    video = torch.zeros(3, 2, 10, 20, dtype=torch.uint8)
    assert resize_cover(video, 30, 30).shape == (3, 2, 30, 30)
    assert resize_cover(video, 30, 30).dtype == torch.uint8


def test_bad_crop_is_a_decode_error(clips):
    with pytest.raises(DecodeError):
        decode_clip(_row(clips["split"]), ClipSpec(1, crop=(0, 80, 0, 10)))


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        ("ten.mp4", dict(codec="libx264", pix_fmt="yuv420p10le"), (16, 32)),
        ("gray.mkv", dict(codec="ffv1", pix_fmt="gray"), (16, 24)),
        ("odd444.mp4", dict(codec="libx264", pix_fmt="yuv444p"), (17, 33)),
        ("odd.avi", dict(codec="mpeg4"), (17, 33)),
        ("j.mkv", dict(codec="mjpeg", pix_fmt="yuvj444p"), (16, 16)),
    ],
)
def test_pixel_formats_decode_to_rgb(tmp_path, name, kwargs, size):
    h, w = size
    path = write_video(tmp_path / name, index_frames(12, h, w), fps=24, **kwargs)
    video = decode_clip(probe_file(path), ClipSpec(3, frame_stride=4, start_frame=1))
    assert video.shape == (3, 3, h, w) and video.dtype == torch.uint8
    assert _ids(video) == [1, 5, 9]


def test_images_give_one_frame_or_repeats(tmp_path):
    picture = np.zeros((10, 20, 3), np.uint8)
    picture[:, :, 1] = 200
    path = write_image(tmp_path / "p.png", picture)
    row = probe_file(path)
    single = decode_clip(row, ClipSpec(1))
    assert single.shape == (3, 1, 10, 20) and int(single[1].min()) == 200
    repeated = decode_clip(row, ClipSpec(4, height=8, width=8))
    assert repeated.shape == (3, 4, 8, 8)
    assert torch.equal(repeated[:, 0], repeated[:, 3])


def test_decode_errors(tmp_path, clips):
    with pytest.raises(DecodeError) as info:
        decode_clip({"path": str(tmp_path / "gone.mp4"), "num_frames": 4, "fps": 24}, ClipSpec(2))
    assert info.value.path.endswith("gone.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(DecodeError):
        decode_clip({"path": str(tmp_path / "text.mp4"), "num_frames": 4, "fps": 24}, ClipSpec(2))
    with pytest.raises(DecodeError, match="has 40"):
        decode_clip(_row(clips["h264_mp4"]), ClipSpec(8, frame_stride=6))
    # A row claiming more frames than the file holds fails instead of inventing frames.
    stale = _row(clips["h264_mp4"]) | {"num_frames": 80}
    with pytest.raises(DecodeError, match="ends before"):
        decode_clip(stale, ClipSpec(2, start_frame=60))


def test_seek_that_lands_too_late_retries_from_further_back(clips, monkeypatch):
    # Real demuxers seek correctly on these files, so make the first seek "overshoot" and check the retry.
    import frameloom.data.video as video_module

    real_attempt = video_module._attempt
    seeks = []

    def flaky_attempt(path, wanted, fps, seek_seconds):
        seeks.append(seek_seconds)
        if len(seeks) == 1:
            raise video_module._Overshoot
        return real_attempt(path, wanted, fps, seek_seconds)

    monkeypatch.setattr(video_module, "_attempt", flaky_attempt)
    got = read_frames(clips["h264_mp4"], [30, 32], fps=24.0)
    assert seeks == [pytest.approx(30 / 24), pytest.approx(30 / 24 - 1.0)]
    assert [frame_index_of(f) for f in got.frames] == [30, 32]
