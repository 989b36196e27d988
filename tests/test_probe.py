"""Probing real files: exact frame counts on every codec and container, displayed size, rotation, rejects."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from frameloom.data.probe import REASONS, ProbeError, _mov_rotation, probe_file, probe_many, rotation_of
from frameloom.errors import FrameloomError
from media import (
    full_decode_count,
    has_encoder,
    index_frames,
    split_frames,
    truncate,
    write_audio,
    write_image,
    write_video,
)

# name -> (file name, writer kwargs, frames (T, H, W), expected codec). Sizes and counts are tiny on purpose.
GOOD = {
    "h264_mp4": ("a.mp4", dict(codec="libx264"), (24, 32, 48), "h264"),
    "h264_faststart_mp4": (
        "fs.mp4",
        dict(codec="libx264", container_options={"movflags": "faststart"}),
        (20, 32, 32),
        "h264",
    ),
    "h264_mov": ("a.mov", dict(codec="libx264"), (12, 16, 32), "h264"),
    "h264_m4v": ("a.m4v", dict(codec="libx264"), (12, 16, 32), "h264"),
    "h264_mkv_gray": ("g.mkv", dict(codec="libx264", pix_fmt="gray"), (10, 32, 32), "h264"),
    "h264_yuv444_odd": ("odd444.mp4", dict(codec="libx264", pix_fmt="yuv444p"), (15, 17, 33), "h264"),
    "h264_10bit": ("ten.mp4", dict(codec="libx264", pix_fmt="yuv420p10le"), (12, 16, 32), "h264"),
    "mpeg4_avi_odd": ("m4.avi", dict(codec="mpeg4"), (21, 17, 33), "mpeg4"),
    "mpeg4_mp4_odd": ("m4.mp4", dict(codec="mpeg4"), (13, 17, 33), "mpeg4"),
    "mjpeg_avi_odd": ("mj.avi", dict(codec="mjpeg"), (11, 17, 33), "mjpeg"),
    "mjpeg_mkv": ("mj.mkv", dict(codec="mjpeg", pix_fmt="yuvj444p"), (9, 16, 16), "mjpeg"),
    "ffv1_gray_mkv": ("gray.mkv", dict(codec="ffv1", pix_fmt="gray"), (8, 16, 24), "ffv1"),
    "vp9_webm": ("v.webm", dict(codec="libvpx-vp9"), (16, 32, 32), "vp9"),
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe_media")


@pytest.fixture(scope="module")
def good_files(media_dir) -> dict[str, Path]:
    files = {}
    for name, (filename, kwargs, (t, h, w), _) in GOOD.items():
        if not has_encoder(kwargs["codec"]):
            continue
        files[name] = write_video(media_dir / filename, index_frames(t, h, w), fps=24, **kwargs)
    return files


@pytest.mark.parametrize("name", list(GOOD))
def test_frame_count_equals_full_decode(good_files, name):
    if name not in good_files:
        pytest.skip(f"this PyAV build cannot encode {GOOD[name][1]['codec']}")
    path = good_files[name]
    _, _, (t, h, w), codec = GOOD[name]
    row = probe_file(path)
    assert row["num_frames"] == full_decode_count(path) == t
    assert (row["height"], row["width"]) == (h, w)
    assert row["fps"] == pytest.approx(24.0)
    assert row["duration"] == pytest.approx(t / 24, abs=2.5e-3)  # Matroska keeps milliseconds
    assert row["codec"] == codec
    assert row["rotation"] == 0
    assert row["is_image"] is False
    assert row["path"] == str(path)


@pytest.mark.parametrize("name, codec", [("t.ts", "libx264"), ("t.mpg", "mpeg2video"), ("t.flv", "flv")])
def test_containers_without_an_index_count_and_time_by_packets(tmp_path, name, codec):
    # MPEG-TS/PS and FLV state neither a frame count nor a reliable duration.
    path = write_video(tmp_path / name, index_frames(20, 32, 32), fps=24, codec=codec)
    row = probe_file(path)
    assert row["num_frames"] == full_decode_count(path) == 20
    assert row["fps"] == pytest.approx(24.0, rel=0.02)
    assert row["duration"] == pytest.approx(20 / 24, rel=0.05)


def test_ntsc_rate(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", index_frames(10, 16, 16), fps=Fraction(30000, 1001))
    assert probe_file(path)["fps"] == pytest.approx(29.97, abs=1e-2)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_swaps_displayed_size(tmp_path, rotation):
    path = write_video(tmp_path / f"r{rotation}.mp4", split_frames(5, 16, 32), fps=10, rotation=rotation)
    row = probe_file(path)
    assert row["rotation"] == rotation
    expected = (32, 16) if rotation in (90, 270) else (16, 32)
    assert (row["height"], row["width"]) == expected
    assert row["num_frames"] == 5


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_counts_frames_not_duration(tmp_path, suffix):
    # Ten frames over 2.1 s with irregular gaps: the count is 10, whatever the nominal rate says.
    pts = [0, 1, 2, 5, 6, 7, 12, 13, 20, 21]
    codec = "libx264" if suffix == ".mp4" else "mjpeg"
    path = write_video(
        tmp_path / f"vfr{suffix}", index_frames(10, 16, 16), codec=codec, pts=pts, time_base=Fraction(1, 10)
    )
    row = probe_file(path)
    assert row["num_frames"] == full_decode_count(path) == 10
    if suffix == ".mp4":
        # MP4 states its duration; fps is the average rate over it.
        assert row["duration"] == pytest.approx(row["num_frames"] / row["fps"], rel=0.02)
    else:
        # Matroska's header rate is only the muxer's default (24 here). The measured rate puts the last
        # frame index on the last frame, 2.1 s in; the duration adds that frame's display time.
        assert (row["num_frames"] - 1) / row["fps"] == pytest.approx(2.1, abs=0.01)
        assert 2.1 < row["duration"] < 2.3


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp"])
def test_images_are_one_frame_with_fps_zero(tmp_path, suffix):
    if suffix == ".webp" and not has_encoder("libwebp"):
        pytest.skip("no webp encoder")
    path = write_image(tmp_path / f"img{suffix}", np.full((10, 20, 3), 90, np.uint8))
    row = probe_file(path)
    assert row["is_image"] is True
    assert (row["num_frames"], row["height"], row["width"]) == (1, 10, 20)
    assert row["fps"] == 0.0 and row["duration"] == 0.0


def _reason(path) -> str:
    with pytest.raises(ProbeError) as info:
        probe_file(path)
    assert info.value.reason in REASONS
    assert isinstance(info.value, FrameloomError)
    return info.value.reason


def test_missing_and_empty(tmp_path):
    assert _reason(tmp_path / "nope.mp4") == "missing"
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert _reason(tmp_path / "zero.mp4") == "empty"


def test_text_named_mp4_is_not_media(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is a caption file, not a video\n" * 20)
    assert _reason(tmp_path / "notes.mp4") == "not_media"


@pytest.mark.parametrize("name", ["a.m4a", "a.wav", "a.mka"])
def test_audio_only_has_no_video_stream(tmp_path, name):
    codec = {"a.m4a": "aac", "a.wav": "pcm_s16le", "a.mka": "mp2"}[name]
    assert _reason(write_audio(tmp_path / name, codec=codec)) == "no_video_stream"


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("cut.mp4", dict(codec="libx264")),  # index (moov) at the end: cut off entirely
        ("cutfs.mp4", dict(codec="libx264", container_options={"movflags": "faststart"})),  # index survives
        ("cut.mkv", dict(codec="libx264")),
        ("cut.webm", dict(codec="libvpx-vp9")),
        ("cut.avi", dict(codec="mjpeg")),
    ],
)
def test_truncated_files_are_undecodable(tmp_path, name, kwargs):
    if not has_encoder(kwargs["codec"]):
        pytest.skip(f"no {kwargs['codec']} encoder")
    rng = np.random.default_rng(0)
    # Noise does not compress, so the cut lands in the middle of the frame data.
    frames = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    whole = write_video(tmp_path / f"whole_{name}", frames, **kwargs)
    assert _reason(truncate(whole, tmp_path / name, 0.5)) == "undecodable"


def test_probe_many_keeps_order_and_never_raises(tmp_path, good_files):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    audio = write_audio(tmp_path / "a.wav", codec="pcm_s16le")
    good = [good_files["h264_mp4"], good_files["mjpeg_avi_odd"], good_files["mpeg4_mp4_odd"]]
    paths = [good[0], tmp_path / "zero.mp4", good[1], tmp_path / "missing.mp4", tmp_path / "text.mp4"]
    paths += [audio, good[2]]
    for workers in (1, 2):
        rows, rejects = probe_many(paths, workers=workers, progress=False)
        assert [r["path"] for r in rows] == [str(p) for p in good]
        assert [(p, reason) for p, reason, _ in rejects] == [
            (str(tmp_path / "zero.mp4"), "empty"),
            (str(tmp_path / "missing.mp4"), "missing"),
            (str(tmp_path / "text.mp4"), "not_media"),
            (str(audio), "no_video_stream"),
        ]
        assert all(isinstance(detail, str) for _, _, detail in rejects)


def test_probe_many_empty_input():
    assert probe_many([], workers=2, progress=False) == ([], [])


def test_probe_error_rejects_unknown_reason():
    with pytest.raises(ValueError):
        ProbeError("x.mp4", "bad_reason")


def test_mp4_rotation_read_without_decoding_matches_the_decoder(tmp_path):
    for rotation in (0, 90, 180, 270):
        path = write_video(tmp_path / f"m{rotation}.mp4", split_frames(2, 16, 32), fps=10, rotation=rotation)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = rotation_of(next(container.decode(stream)), stream)
        assert probe_file(path)["rotation"] == decoded == rotation


def test_tkhd_version1_and_track_choice(tmp_path):
    # A hand-built 64-bit track header (version 1), as long recordings carry: track 2 turned 270 degrees.
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(payload), kind) + payload

    def tkhd_v1(track_id: int, a: int, b: int) -> bytes:
        head = b"\x01\x00\x00\x00" + bytes(16) + struct.pack(">I", track_id) + bytes(4 + 8 + 8 + 8)
        matrix = struct.pack(">9i", a, b, 0, -b, a, 0, 0, 0, 1 << 30)
        return box(b"tkhd", head + matrix + struct.pack(">II", 32 << 16, 16 << 16))

    one = 1 << 16
    moov = box(b"moov", box(b"trak", tkhd_v1(1, one, 0)) + box(b"trak", tkhd_v1(2, 0, -one)))
    data = box(b"ftyp", b"isom" + bytes(4)) + moov
    path = tmp_path / "v1.mp4"
    path.write_bytes(data)
    assert _mov_rotation(path, 2, len(data)) == 270
    assert _mov_rotation(path, 1, len(data)) == 0
