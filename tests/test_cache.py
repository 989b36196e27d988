"""The content-keyed latent/text cache: keys, atomic store, resumable builder, cached dataset.

Tiny mp4s (16x16, 6 frames) are written with PyAV and decoded by the real ``decode_clip``; the codec is
``PixelCodec`` and the text encoder the tiny T5, so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save
from torch.utils.data import DataLoader

from frameloom.cache import (
    CachedClipDataset,
    CacheMissError,
    CacheStore,
    build_cache,
    collate_text,
    file_identity,
    row_video_key,
    row_view,
    text_key,
    video_key,
)
from frameloom.cache.store import _host
from frameloom.data.manifest import from_rows, resolve_path, write_manifest
from frameloom.data.video import ClipSpec, decode_clip
from frameloom.models.codecs import PixelCodec
from frameloom.models.text import T5TextEncoder, build_tiny_t5

SPEC = ClipSpec(num_frames=4)
CAPTIONS = ["a red square moving left", "a blue circle moving up", "a red square moving left", "green"]


# ------------------------------------------------------------------------------------------------ fixtures


def _write_mp4(path: Path, color: tuple[int, int, int], frames: int = 6, size: int = 16) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), np.uint8)
            img[:] = color
            img[i % size, :, :] = 255  # a moving line, so frames differ
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> T5TextEncoder:
    return T5TextEncoder.from_pretrained(build_tiny_t5(tmp_path_factory.mktemp("t5")), max_length=32)


def _row(path: str, text: str, **extra) -> dict:
    return {"path": path, "text": text, "num_frames": 6, "height": 16, "width": 16, "fps": 8.0, **extra}


@pytest.fixture
def data(tmp_path) -> Path:
    """4 good clips (two share a caption) in ``good.parquet``; plus a corrupt file in ``with_bad.parquet``."""
    colors = [(200, 0, 0), (0, 0, 200), (0, 200, 0), (90, 90, 90)]
    rows = []
    for i, (color, text) in enumerate(zip(colors, CAPTIONS)):
        _write_mp4(tmp_path / f"clip{i}.mp4", color)
        rows.append(_row(f"clip{i}.mp4", text))
    (tmp_path / "bad.mp4").write_bytes(b"this is not a video" * 50)
    write_manifest(from_rows(rows), tmp_path / "good.parquet")
    write_manifest(from_rows(rows + [_row("bad.mp4", "a broken clip")]), tmp_path / "with_bad.parquet")
    return tmp_path


def _build(manifest, store, text_encoder, codec=None, **kw):
    kw.setdefault("codec", codec or PixelCodec())
    return build_cache(manifest, spec=SPEC, text_encoder=text_encoder, store=store, progress=False, **kw)


def _entries(store: CacheStore, kind: str) -> set[str]:
    return set(store.keys(kind))


# ---------------------------------------------------------------------------------------------------- keys


def test_file_identity_tracks_content_and_mtime_not_path(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))  # 3 MiB: head and tail are distinct chunks
    first = file_identity(big)
    assert file_identity(big) == first
    # Same bytes and mtime elsewhere: same identity (the path is not part of it).
    copy = tmp_path / "elsewhere.bin"
    shutil.copy2(big, copy)
    assert file_identity(copy) == first
    # A touch changes it.
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_identity(big) != first
    # A tail edit with the mtime put back is still caught (the last MiB is hashed).
    st = copy.stat()
    with open(copy, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_identity(copy) != first


def test_keys_change_exactly_when_their_inputs_change(data):
    store = CacheStore(data / "cache")
    manifest = data / "good.parquet"

    def keys(spec=SPEC, codec="codec-a", text="text-a"):
        ds = CachedClipDataset(manifest, spec, codec, text, store)
        return ds.video_keys, ds.text_keys

    video0, text0 = keys()
    assert len(set(video0)) == 4  # four distinct clips
    assert text0[0] == text0[2] and len(set(text0)) == 3  # a shared caption shares its entry

    # Touching one file changes only that entry's video key.
    st = (data / "clip1.mp4").stat()
    os.utime(data / "clip1.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    video1, text1 = keys()
    assert [a != b for a, b in zip(video0, video1)] == [False, True, False, False]
    assert text1 == text0

    # Another clip spec: every video key changes, no text key does.
    video2, text2 = keys(spec=ClipSpec(num_frames=4, height=8, width=8))
    assert all(a != b for a, b in zip(video1, video2)) and text2 == text0

    # Another codec changes only video keys; another text encoder only text keys.
    video3, text3 = keys(codec="codec-b")
    assert all(a != b for a, b in zip(video1, video3)) and text3 == text0
    video4, text4 = keys(text="text-b")
    assert video4 == video1 and all(a != b for a, b in zip(text0, text4))


def test_rows_cutting_one_file_differently_do_not_share_an_entry(data):
    manifest = data / "good.parquet"
    whole = _row("clip0.mp4", "x")
    assert row_view(whole) == row_view({**whole, "cut_start": None})  # absent == empty
    cut = {**whole, "cut_start": 2, "cut_end": 6}
    assert row_video_key(whole, manifest, SPEC, "c") != row_video_key(cut, manifest, SPEC, "c")
    fid = file_identity(resolve_path(manifest, "clip0.mp4"))
    assert row_video_key(whole, manifest, SPEC, "c") == video_key(fid, SPEC, "c", row_view(whole))


def test_text_key_is_verbatim_and_encoder_specific():
    assert text_key("a cat", "enc") == text_key("a cat", "enc")
    assert text_key("a cat", "enc") != text_key("a cat ", "enc")
    assert text_key("a cat", "enc") != text_key("a cat", "enc2")
    assert text_key("", "enc") != text_key("", "enc2")


# --------------------------------------------------------------------------------------------------- store


def test_store_round_trip(tmp_path):
    store = CacheStore(tmp_path)
    key = text_key("hello", "enc")
    assert not store.has("text", key) and store.get("text", key) is None
    emb = torch.randn(3, 4)[1:]  # a view: must be stored as its own tensor
    path = store.put("text", key, {"emb": emb, "mask": torch.ones(2, dtype=torch.bool)}, {"text": "hello"})
    assert path == tmp_path / "text" / key[:2] / f"{key}.safetensors"
    got = store.get("text", key)
    assert torch.equal(got["emb"], emb) and got["mask"].dtype == torch.bool
    assert store.has("text", key) and store.metadata("text", key) == {"text": "hello"}
    assert list(store.keys("text")) == [key]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_store_rejects_bad_kinds_and_keys(tmp_path):
    store = CacheStore(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        store.path("latents", "ab" * 32)
    with pytest.raises(ValueError, match="key"):
        store.path("video", "../../etc/passwd")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_are_ignored_and_cleaned(tmp_path):
    store = CacheStore(tmp_path)
    key = text_key("never finished", "enc")
    folder = tmp_path / "text" / key[:2]
    folder.mkdir(parents=True)
    payload = save({"emb": torch.zeros(2, 4)})  # complete content, but under a temp name
    killed = folder / f".{key}.{_host()}.{_dead_pid()}.0123abcd.tmp"
    running = folder / f".{key}.{_host()}.{os.getpid()}.4567cdef.tmp"  # a live writer (this process)
    stale = folder / f".{key}.otherhost.123.89abcdef.tmp"  # another host, long ago
    for f in (killed, running, stale):
        f.write_bytes(payload)
    old = time.time() - 7200
    os.utime(stale, (old, old))

    assert not store.has("text", key) and store.get("text", key) is None
    assert list(store.keys("text")) == []
    assert store.cleanup_temp() == 2
    assert sorted(p.name for p in folder.iterdir()) == [running.name]


def test_truncated_or_garbage_entries_count_as_missing(tmp_path):
    store = CacheStore(tmp_path)
    key = text_key("x", "enc")
    path = store.put("text", key, {"emb": torch.randn(5, 8)})
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    assert not store.has("text", key) and store.get("text", key) is None
    path.write_bytes(b"\x00" * 3)
    assert not store.has("text", key) and store.get("text", key) is None
    path.write_bytes(data)
    assert store.has("text", key)


# ------------------------------------------------------------------------------------------------- builder


def test_build_then_rebuild_reuses_everything(data, text_encoder):
    store = CacheStore(data / "cache")
    report = _build(data / "with_bad.parquet", store, text_encoder, batch_size=3)
    assert (report.encoded, report.reused) == (4, 0)
    assert [Path(p).name for p, _ in report.failed] == ["bad.mp4"]  # reported, not fatal
    assert report.text_encoded == 5  # 3 distinct good captions + the broken clip's + ""
    assert "4 clips encoded" in report.line() and "1 failed" in report.line()
    assert len(_entries(store, "video")) == 4 and len(_entries(store, "text")) == 5
    assert store.has("text", text_key("", text_encoder.identity))

    again = _build(data / "with_bad.parquet", store, text_encoder, batch_size=3)
    assert (again.encoded, again.reused, len(again.failed)) == (0, 4, 1)
    assert (again.text_encoded, again.text_reused) == (0, 5)


class _FlakyCodec(PixelCodec):
    """PixelCodec that dies after ``survive`` clips, like a run killed mid-way."""

    def __init__(self, survive: int):
        super().__init__()
        self.left = survive

    def encode(self, video, generator=None):
        if self.left < video.shape[0]:
            raise RuntimeError("killed")
        self.left -= video.shape[0]
        return super().encode(video)


def test_killed_run_resumes_with_exactly_the_remaining_rows(data, text_encoder):
    store = CacheStore(data / "cache")
    with pytest.raises(RuntimeError, match="killed"):
        _build(data / "good.parquet", store, text_encoder, codec=_FlakyCodec(survive=2), batch_size=1)
    assert len(_entries(store, "video")) == 2  # what was encoded before the crash is kept
    resumed = _build(data / "good.parquet", store, text_encoder, batch_size=1)
    assert (resumed.encoded, resumed.reused) == (2, 2)


def test_damaged_entry_is_encoded_again(data, text_encoder):
    store = CacheStore(data / "cache")
    _build(data / "good.parquet", store, text_encoder)
    victim = store.path("video", sorted(_entries(store, "video"))[0])
    victim.write_bytes(victim.read_bytes()[:100])
    report = _build(data / "good.parquet", store, text_encoder)
    assert (report.encoded, report.reused) == (1, 3)
    assert store.get("video", victim.stem) is not None


def test_missing_file_is_reported(data, text_encoder):
    write_manifest(from_rows([_row("clip0.mp4", "a"), _row("gone.mp4", "b")]), data / "m.parquet")
    report = _build(data / "m.parquet", CacheStore(data / "cache"), text_encoder)
    assert report.encoded == 1
    assert len(report.failed) == 1 and report.failed[0][0].endswith("gone.mp4")
    assert "cannot read file" in report.failed[0][1]


def test_shards_split_the_rows(data, text_encoder):
    store = CacheStore(data / "cache")
    r0 = _build(data / "good.parquet", store, text_encoder, shard=(0, 2))
    assert len(_entries(store, "video")) == 2
    r1 = _build(data / "good.parquet", store, text_encoder, shard=(1, 2))
    assert (r0.encoded, r1.encoded, r1.reused) == (2, 2, 0)
    assert len(_entries(store, "video")) == 4
    # rank 0: captions of rows 0 and 2 (the same) + ""; rank 1: rows 1 and 3.
    assert (r0.text_encoded, r1.text_encoded) == (2, 2)
    with pytest.raises(ValueError):
        _build(data / "good.parquet", store, text_encoder, shard=(2, 2))


class _CountingCodec(PixelCodec):
    def __init__(self):
        super().__init__()
        self.batches: list[tuple[int, ...]] = []

    def encode(self, video, generator=None):
        self.batches.append(tuple(video.shape))
        return super().encode(video)


def test_spec_for_row_batches_by_shape(data, text_encoder):
    store = CacheStore(data / "cache")
    codec = _CountingCodec()
    short, long = ClipSpec(num_frames=4), ClipSpec(num_frames=6)
    by_path = {"clip0.mp4": short, "clip1.mp4": short, "clip2.mp4": long, "clip3.mp4": short}
    report = _build(
        data / "good.parquet", store, text_encoder, codec=codec, spec_for_row=lambda r: by_path[r["path"]]
    )
    assert report.encoded == 4
    # Consecutive equal shapes share a batch; a new shape flushes the batch.
    assert [b[0] for b in codec.batches] == [2, 1, 1]
    assert [b[2] for b in codec.batches] == [4, 6, 4]
    ds = CachedClipDataset(data / "good.parquet", SPEC, codec.identity, text_encoder.identity, store,
                           spec_for_row=lambda r: by_path[r["path"]])  # fmt: skip
    assert ds.missing() == [] and ds[2]["latent"].shape == (3, 6, 16, 16)


# ------------------------------------------------------------------------------------------------- dataset


def test_dataset_items_missing_and_collate(data, text_encoder):
    store = CacheStore(data / "cache")
    manifest = data / "good.parquet"
    codec = PixelCodec()
    ds = CachedClipDataset(manifest, SPEC, codec.identity, text_encoder.identity, store)
    assert len(ds) == 4 and ds.missing() == [0, 1, 2, 3]
    with pytest.raises(CacheMissError):
        ds[0]

    _build(manifest, store, text_encoder)
    assert ds.missing() == []
    item = ds[1]
    expected_clip = decode_clip(_row("clip1.mp4", CAPTIONS[1]), SPEC, root=data, output="float")
    assert torch.equal(item["latent"], expected_clip)
    assert item["latent"].shape == (3, 4, 16, 16) and item["index"] == 1
    emb, mask = text_encoder.encode([CAPTIONS[1]])
    n = len(CAPTIONS[1].encode()) + 1
    assert item["text_mask"].dtype == torch.bool and item["text_mask"].tolist() == [True] * n
    assert torch.allclose(item["text_emb"], emb[0, :n], atol=1e-6)
    empty_emb, empty_mask = ds.empty_text()
    assert empty_emb.shape == (1, text_encoder.dim) and empty_mask.tolist() == [True]

    batch = collate_text([ds[3], ds[1]])  # "green" (6 tokens) is padded to the other caption's length
    assert batch["latent"].shape == (2, 3, 4, 16, 16)
    assert batch["text_emb"].shape == (2, n, text_encoder.dim)
    assert batch["text_mask"].sum(1).tolist() == [6, n]
    assert (batch["text_emb"][0, 6:] == 0).all()
    assert batch["index"].tolist() == [3, 1]
    loaded = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert loaded["index"].tolist() == [0, 1, 2, 3]

    # A lost text entry shows up as missing for every row with that caption.
    store.path("text", ds.text_keys[0]).unlink()
    assert ds.missing() == [0, 2]


# ---------------------------------------------------------------------------------------------- key index


def test_start_up_reads_the_key_index_and_no_video(data, text_encoder, monkeypatch):
    from frameloom.cache import dataset as cached_dataset
    from frameloom.cache import keys as cache_keys

    store = CacheStore(data / "cache")
    manifest = data / "good.parquet"
    codec = PixelCodec()
    # Two processes build half each; the index is only whole when both parts are written. (The manifest's own
    # identity is read for the index's name: it is not a video.)
    _build(manifest, store, text_encoder, shard=(0, 2))
    half = CachedClipDataset(manifest, SPEC, codec.identity, text_encoder.identity, store)
    assert half.index is None  # one part of two: not an index yet (keys computed the old way)
    _build(manifest, store, text_encoder, shard=(1, 2))

    def no_video(*args, **kwargs):
        raise AssertionError("a video was read at start-up")

    monkeypatch.setattr(cache_keys, "file_identity", no_video)
    monkeypatch.setattr(cached_dataset, "row_video_key", no_video)
    for i in range(4):  # the videos are gone: only the manifest, the index and the store are read
        (data / f"clip{i}.mp4").rename(data / f"clip{i}.gone")
    ds = CachedClipDataset(manifest, SPEC, codec.identity, text_encoder.identity, store)
    assert ds.index is not None and len(ds.index) == 4 and ds.missing() == []
    item = ds[2]  # encoded from the real file before it moved
    assert item["latent"].shape == (3, 4, 16, 16) and item["text_mask"].sum() == len(CAPTIONS[2]) + 1
    # An entry lost after the build: the spot check finds it, and then every entry is checked.
    latent_key = ds.index.video_key(1, -1)
    store.path("video", latent_key).unlink()
    assert ds.missing() == [1]


def test_another_run_has_no_index_and_a_failed_row_is_incomplete(data, text_encoder):
    store = CacheStore(data / "cache")
    codec = PixelCodec()
    report = _build(data / "with_bad.parquet", store, text_encoder)
    assert len(report.failed) == 1
    ds = CachedClipDataset(data / "with_bad.parquet", SPEC, codec.identity, text_encoder.identity, store)
    assert ds.index is not None and ds.missing() == [4]  # bad.mp4: no key, incomplete
    other = CachedClipDataset(data / "with_bad.parquet", ClipSpec(num_frames=2), codec.identity,
                              text_encoder.identity, store)  # fmt: skip
    assert other.index is None and other.missing() == [0, 1, 2, 3, 4]  # another spec: nothing cached
