"""Caption rules, the per-epoch temporal crop and bucket shapes reach training the same way cached and uncached.

Real tiny mp4s (tests/media.py), the real cache builder, the tiny T5 and the trainer's own datasets: each test
checks what the trainer feeds its model, computed by hand where it is a rule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from frameloom.cache.dataset import CachedClipDataset
from frameloom.cache.keys import text_key
from frameloom.config import load_config
from frameloom.data.manifest import from_rows, write_manifest
from frameloom.data.sampler import SampleRef
from frameloom.data.video import temporal_crop_offset
from frameloom.errors import FrameloomError
from frameloom.pipeline import (
    bucket_policy,
    caption_rules,
    clip_spec,
    load_text_encoder,
    open_store,
    run_cache,
    uncacheable,
)
from frameloom.train.trainer import Trainer
from media import INDEX_STEP, index_frames, write_video
from tiny import TINY


def _row(path: str, text: str, frames: int, h: int, w: int, fps: float, **extra) -> dict:
    return {"path": path, "text": text, "num_frames": frames, "height": h, "width": w, "fps": fps, **extra}


def _config(manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        [*TINY, f"data.manifest={manifest}", f"run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}",
         "checkpoint.every=0", *extra],
    )  # fmt: skip


def _frame_index(video: torch.Tensor) -> list[int]:
    """Source frame indices of an ``index_frames`` clip (C, T, H, W) in [-1, 1] (brightness = i * INDEX_STEP)."""
    level = (video.float() + 1) * 127.5  # back to 0..255
    return [round(float(level[:, t].mean()) / INDEX_STEP) for t in range(video.shape[1])]


# ------------------------------------------------------------------------------------- 1. caption rules


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """4 clips of 12 frames, 16 x 16: two at 25 fps, two at 30 fps; aesthetic scores low / high / middle /
    low; the last caption empty (an unconditional sample)."""
    root = tmp_path_factory.mktemp("captioned")
    rows = []
    for i, (fps, aes, text) in enumerate([(25, 4.0, "clip 0"), (25, 6.0, "clip 1"), (30, 5.0, "clip 2"),
                                           (30, 4.0, "")]):  # fmt: skip
        write_video(root / f"c{i}.mp4", index_frames(12, 16, 16), fps=fps)
        rows.append(_row(f"c{i}.mp4", text, 12, 16, 16, float(fps), aesthetic=aes))
    write_manifest(from_rows(rows), root / "m.parquet")
    return root / "m.parquet"


# data.fps_max=12: stride ceil(25 / 12) = 3 -> the clip is at 25 // 3 = 8 fps; ceil(30 / 12) = 3 -> 30 // 3 = 10.
# Aesthetic "fixed": the first phrase of the list after the caption, then the fps suffix (Open-Sora-Plan's
# phrase, then Open-Sora's suffix); 5.0 is between 4.25 and 5.75 (no phrase); "" stays "".
EXPECTED = [
    "clip 0 This video has a low aesthetic quality. 8 FPS.",
    "clip 1 This video has a high aesthetic quality. 8 FPS.",
    "clip 2 10 FPS.",
    "",
]
RULES = ["data.fps_max=12", "data.caption_fps_suffix=true", "data.caption_aesthetic=fixed"]


def test_caption_rules_reach_the_trainer_cached_and_on_the_fly(captioned, tmp_path):
    # On the fly: the texts the trainer hands its text encoder.
    cfg = _config(captioned, tmp_path / "fly", *RULES, "data.use_cache=never", "train.steps=1")
    trainer = Trainer(cfg)
    seen: list[str] = []
    encode = trainer.text_encoder.encode

    def spy(texts):
        seen.extend(texts)
        return encode(texts)

    trainer.text_encoder.encode = spy
    trainer.fit()
    assert sorted(seen) == sorted(EXPECTED)  # batch_size 4: one step reads every row once
    assert [trainer.dataset[i]["text"] for i in range(4)] == EXPECTED

    # Cached: the cache encodes these exact texts, and the cached dataset reads them.
    cfg = _config(captioned, tmp_path / "cached", *RULES, "train.steps=1")
    run_cache(cfg, progress=False)
    trainer = Trainer(cfg)
    assert trainer.cached
    identity = load_text_encoder(cfg).identity
    store = open_store(cfg)
    assert trainer.dataset.text_keys == [text_key(t, identity) for t in EXPECTED]
    assert [store.metadata("text", k)["text"] for k in trainer.dataset.text_keys] == EXPECTED

    # Changing a rule changes the text keys of the captions it changes (and only those): the cache no
    # longer covers the run, which then encodes on the fly.
    spec = clip_spec(cfg)
    plain = CachedClipDataset(captioned, spec, "pixel-v1", identity, store)
    suffix_only = CachedClipDataset(captioned, spec, "pixel-v1", identity, store,
                                    caption_rules=caption_rules(_config(captioned, tmp_path / "x", *RULES[:2])))  # fmt: skip
    full = trainer.dataset.text_keys
    for i in (0, 1):  # phrase and suffix, suffix only, neither: three texts, three keys
        assert len({plain.text_keys[i], suffix_only.text_keys[i], full[i]}) == 3
    assert plain.text_keys[2] != suffix_only.text_keys[2] == full[2]  # no phrase for 5.0: same text
    assert plain.text_keys[3] == suffix_only.text_keys[3] == full[3]  # "" stays ""
    assert suffix_only.missing() == [0, 1] and plain.missing() == [0, 1, 2]


def test_random_aesthetic_and_random_crop_are_not_cached(captioned, tmp_path):
    cfg = _config(captioned, tmp_path / "run", "data.caption_aesthetic=random", "data.temporal_crop=random")
    assert len(uncacheable(cfg)) == 2
    with pytest.raises(FrameloomError, match="nothing to cache: data.temporal_crop=random"):
        run_cache(cfg, progress=False)
    assert uncacheable(_config(captioned, tmp_path / "run", *RULES)) == []


# ------------------------------------------------------------------------ 2. per-epoch temporal crop


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory) -> Path:
    """4 clips of 30 index frames (16 x 16, 24 fps): a 4-frame window can start at 27 offsets."""
    root = tmp_path_factory.mktemp("long")
    rows = []
    for i in range(4):
        write_video(root / f"l{i}.mp4", index_frames(30, 16, 16), fps=24)
        rows.append(_row(f"l{i}.mp4", f"long {i}", 30, 16, 16, 24.0))
    write_manifest(from_rows(rows), root / "m.parquet")
    return root / "m.parquet"


def _windows(trainer: Trainer) -> list[tuple[int, int, list[int]]]:
    """Run ``fit`` and record (step, row, source frames) of every sample the trainer trained on."""
    out = []
    original = trainer._micro_step

    def spy(batch, micro):
        for row, video in zip(batch["index"].tolist(), batch["video"]):
            out.append((trainer.step, row, _frame_index(video)))
        return original(batch, micro)

    trainer._micro_step = spy
    trainer.fit()
    return out


def test_random_temporal_crop_changes_per_epoch_and_resumes_exactly(long_clips, tmp_path, caplog):
    extra = ["data.temporal_crop=random", "train.batch_size=2", "seed=5"]  # 2 steps per epoch
    with caplog.at_level(logging.WARNING, logger="frameloom.train"):
        whole = Trainer(_config(long_clips, tmp_path / "whole", *extra, "train.steps=6"))
    assert not whole.cached and "not reading the latent cache: data.temporal_crop=random" in caplog.text
    seen = _windows(whole)
    assert len(seen) == 12 and {row for _, row, _ in seen} == {0, 1, 2, 3}
    # Steps 0-1 are epoch 0, 2-3 epoch 1, 4-5 epoch 2 (4 rows, 2 per batch). Stride 1: 30 positions, a window
    # of 4 starts at temporal_crop_offset(30, 4, (seed, row, epoch)) in [0, 26] and runs 4 frames.
    for step, row, frames in seen:
        start = temporal_crop_offset(30, 4, (5, row, step // 2))
        assert frames == [start, start + 1, start + 2, start + 3]
    by_row: dict[int, list[int]] = {}
    for _, row, frames in seen:
        by_row.setdefault(row, []).append(frames[0])
    assert all(len(set(starts)) > 1 for starts in by_row.values())  # each sample: a new window per epoch

    # Stopped after 3 steps (mid epoch 1) and resumed: the same windows as the uninterrupted run.
    Trainer(_config(long_clips, tmp_path / "split", *extra, "train.steps=3", "checkpoint.every=3")).fit()
    resumed = _windows(
        Trainer(_config(long_clips, tmp_path / "split", *extra, "train.steps=6", "checkpoint.resume=latest"))
    )
    assert resumed == seen[6:]


# -------------------------------------------------------------------------------- 3. bucket-aware cache


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> Path:
    """4 clips at 48 x 48 and 4 at 16 x 32 (h x w), 9 frames at 24 fps, each with its own content."""
    root = tmp_path_factory.mktemp("two_sizes")
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (48, 48) if i < 4 else (16, 32)
        frames = index_frames(9, h, w)
        frames[:, : h // 2, : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)  # a coloured corner per clip
        write_video(root / f"s{i}.mp4", frames, fps=24)
        rows.append(_row(f"s{i}.mp4", f"size clip {i}", 9, h, w, 24.0))
    write_manifest(from_rows(rows), root / "m.parquet")
    return root / "m.parquet"


# Open-Sora "48px": P = 2304. Its table holds ratios (h / w) 0.418, 1.78, 0.667, 2.39, 0.5625, 1.5; the one
# nearest a square clip's 1.0 is "3:2" (0.667): w = int(sqrt(2304 * 1.5) // 16) * 16 = 48,
# h = int((2304 / 48) // 16) * 16 = 48. A 48 x 48 clip (area 2304 >= 0.8 P = 1843.2) takes 5 frames there with
# p = 1: always 5 x 48 x 48. A 16 x 32 clip (area 512 < 1843.2) goes on to "16px" (P = 256: every ratio gives
# w = h = 16): 5 frames with the pair (p, q) = (1, 0.5), i.e. it moves on to 3 frames with probability 0.5, so
# each epoch puts it at 5 x 16 x 16 or 3 x 16 x 16: the cache must hold both.
BUCKETS = [
    "data.bucket=opensora",
    "data.bucket_config={48px: {5: [1.0, 2]}, 16px: {5: [[1.0, 0.5], 2], 3: [1.0, 2]}}",
    "train.batch_size=2",
    "data.caption_fps_suffix=true",
    "model.config={patch_size: [1, 8, 8], hidden_size: 32, depth: 2, num_heads: 2}",  # 36 tokens a 48 x 48 frame
]


def _batches(trainer: Trainer) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``fit`` and record (rows, latent, text emb, text mask) of every micro-batch."""
    out = []
    original = trainer._encode

    def spy(batch):
        latent, cond = original(batch)
        out.append(
            (batch["index"].tolist(), latent.detach().clone(), cond.emb.detach().clone(), cond.mask.clone())
        )
        return latent, cond

    trainer._encode = spy
    trainer.fit()
    return out


def test_bucket_cache_holds_every_reachable_shape_and_matches_on_the_fly(two_sizes, tmp_path):
    steps = "train.steps=8"
    cfg = _config(two_sizes, tmp_path / "cached", *BUCKETS, steps)
    policy = bucket_policy(cfg)
    rows, buckets = policy.reachable()
    shapes = {(r, policy.table.shape(b)) for r, b in zip(rows.tolist(), buckets.tolist())}
    assert shapes == {(r, (5, 48, 48)) for r in range(4)} | {
        (r, s) for r in range(4, 8) for s in [(5, 16, 16), (3, 16, 16)]
    }
    report = run_cache(cfg, progress=False)
    assert report.encoded == 12 and not report.failed

    cached = Trainer(cfg)
    assert cached.cached and cached.dataset.missing() == []
    fly = Trainer(_config(two_sizes, tmp_path / "fly", *BUCKETS, steps, "data.use_cache=never"))
    assert not fly.cached
    a, b = _batches(cached), _batches(fly)
    assert len(a) == len(b) == 8
    seen_shapes = set()
    for (rows_a, lat_a, emb_a, mask_a), (rows_b, lat_b, emb_b, mask_b) in zip(a, b):
        assert rows_a == rows_b
        shape = tuple(lat_a.shape[2:])
        # A batch of 48 x 48 rows has their bucket's shape; 16 x 32 rows one of their two.
        assert shape == (5, 48, 48) if rows_a[0] < 4 else shape in {(5, 16, 16), (3, 16, 16)}
        seen_shapes.add(shape)
        assert lat_a.shape == lat_b.shape and torch.allclose(lat_a, lat_b, atol=1e-6, rtol=0)
        for i in range(len(rows_a)):  # captions: the real tokens (cached ones are trimmed, then padded)
            assert torch.equal(mask_a[i][mask_a[i]], mask_b[i][mask_b[i]])
            assert torch.allclose(emb_a[i][mask_a[i]], emb_b[i][mask_b[i]], atol=1e-5)
    assert seen_shapes == {(5, 48, 48), (5, 16, 16), (3, 16, 16)}


def test_cached_dataset_reads_the_entry_of_the_refs_bucket(two_sizes, tmp_path):
    cfg = _config(two_sizes, tmp_path / "run", *BUCKETS)
    run_cache(cfg, progress=False)
    policy = bucket_policy(cfg)
    identity = load_text_encoder(cfg).identity
    ds = CachedClipDataset(two_sizes, clip_spec(cfg), "pixel-v1", identity, open_store(cfg),
                           buckets=policy, caption_rules=caption_rules(cfg))  # fmt: skip
    rows, buckets = policy.reachable()
    five, three = (int(b) for b in buckets[rows == 4])  # row 4's two buckets, 5 frames first (ids ascend)
    assert ds[SampleRef(4, five, 0)]["latent"].shape == (3, 5, 16, 16)
    assert ds[SampleRef(4, three, 7)]["latent"].shape == (3, 3, 16, 16)
    # Both are the first frames of the clip (start crop, stride 1): the 3-frame entry is the 5-frame one's head.
    assert torch.equal(ds[SampleRef(4, five, 0)]["latent"][:, :3], ds[SampleRef(4, three, 0)]["latent"])
    # A plain index reads the row's epoch-0 bucket.
    epoch0 = int(policy.assign(0).bucket[4])
    assert torch.equal(ds[4]["latent"], ds[SampleRef(4, epoch0, 0)]["latent"])
    # Without the policy the base spec's entries (4 x 8 x 8) were never cached.
    assert CachedClipDataset(
        two_sizes, clip_spec(cfg), "pixel-v1", identity, open_store(cfg)
    ).missing() == list(range(8))
