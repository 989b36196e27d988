"""Samplers: one shape per batch, disjoint ranks, pure order, exact and elastic resume (2 gloo processes),
deterministic substitutes for clips that fail to decode, and the trainer on a bucket policy."""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from frameloom.config import load_config
from frameloom.data.buckets import build_policy, read_columns
from frameloom.data.sampler import (
    BucketBatchSampler,
    EpochPlanner,
    ResumableBatchSampler,
    SampleRef,
    build_sampler,
    substitute_index,
)

# Two resolutions, a (p, q) pair and per-GPU batch sizes 2 and 3: decisions change every epoch.
CFG = [
    "data.bucket=opensora",
    "data.megabatch=2",
    "data.bucket_config={512px: {33: [0.5, 2]}, 256px: {65: [[0.7, 0.3], 2], 33: [1.0, 3]}}",
]


def write_rows(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A manifest of n rows with random sizes and lengths (no media: samplers read columns only)."""
    rng = np.random.default_rng(seed)
    h = rng.choice([240, 480, 720], n)
    w = (h * rng.choice([16 / 9, 1.0, 9 / 16], n)).astype(np.int64)
    table = pa.table(
        {
            "path": [f"v{i}.mp4" for i in range(n)],
            "text": ["x"] * n,
            "num_frames": rng.integers(20, 120, n),
            "height": h,
            "width": w,
            "fps": np.full(n, 24.0),
            "aspect_ratio": h / w,
            "resolution": h * w,
        }
    )
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "m.parquet")


def planner_for(manifest: Path, *extra: str) -> EpochPlanner:
    cfg = load_config(None, [*CFG, f"data.manifest={manifest}", *extra])
    return EpochPlanner(build_policy(cfg, read_columns(manifest)), cfg.seed, cfg.data.megabatch)


def take_epoch(sampler, epoch: int = 0) -> list[list[int]]:
    """This rank's batches until the sampler's next batch belongs to another epoch."""
    it = iter(sampler)
    out = []
    while sampler.position()[0] == epoch:
        out.append(list(next(it)))
    return out


def micro_batches(
    planner: EpochPlanner, epoch: int, first: int = 0, last: int | None = None
) -> list[list[int]]:
    plan = planner.plan(epoch)
    return [plan.batch(t).tolist() for t in range(first, plan.num_batches if last is None else last)]


# ----------------------------------------------------------------------------- in one process


def test_batches_have_one_shape_and_ranks_are_disjoint(manifest):
    planner = planner_for(manifest)
    plan = planner.plan(0)
    table = planner.policy.table
    world = 3
    per_rank = [
        take_epoch(BucketBatchSampler(planner, rank=r, world_size=world, refs=False)) for r in range(world)
    ]
    steps = plan.num_batches // world
    assert all(len(b) == steps for b in per_rank)
    for r, batches in enumerate(per_rank):
        for k, batch in enumerate(batches):
            t = k * world + r  # step k of rank r is micro-batch k * W + r
            bucket = int(plan.bucket[t])
            assert set(plan.assignment[batch]) == {bucket}  # one bucket, so one shape
            assert len(batch) == table.batch_size[bucket]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # disjoint across ranks and steps
    assert sorted(seen) == sorted(i for b in micro_batches(planner, 0, 0, steps * world) for i in b)
    # Rows left out this epoch: not assigned, or a batch remainder of their bucket (< batch size each).
    kept = np.flatnonzero(plan.assignment >= 0)
    remainder = len(kept) - int(plan.offsets[-1])
    assert 0 <= remainder < int(table.batch_size.max()) * len(table)


@pytest.mark.parametrize("megabatch", [1, 2, 3])
def test_megabatch_composition(manifest, megabatch):
    # The epoch's micro-batch sequence is the bucket's batches cut into megabatches of `megabatch`
    # consecutive batches (the last of a bucket may be shorter), each megabatch contiguous and in order,
    # every megabatch exactly once, in a shuffled order.
    planner = planner_for(manifest, f"data.megabatch={megabatch}")
    plan = planner.plan(0)
    batch = planner.policy.table.batch_size
    first_row = {int(b): int(plan.start[plan.bucket == b].min()) for b in np.unique(plan.bucket)}
    local = [(int(plan.start[t]) - first_row[int(plan.bucket[t])]) // int(batch[plan.bucket[t]])
             for t in range(plan.num_batches)]  # fmt: skip
    ids = [(int(plan.bucket[t]), local[t] // megabatch) for t in range(plan.num_batches)]
    groups: list[list[int]] = []  # runs of micro-batches of one megabatch id, in epoch order
    for t, mid in enumerate(ids):
        if groups and ids[groups[-1][0]] == mid and local[groups[-1][-1]] + 1 == local[t]:
            groups[-1].append(t)
        else:
            groups.append([t])
    seen = [ids[g[0]] for g in groups]
    assert len(seen) == len(set(seen))  # each megabatch is one contiguous run
    counts = {int(b): int((plan.bucket == b).sum()) for b in np.unique(plan.bucket)}
    for g in groups:
        b, k = ids[g[0]]
        assert [local[t] for t in g] == list(range(k * megabatch, min((k + 1) * megabatch, counts[b])))
    assert sorted(seen) == sorted({(b, j // megabatch) for b, n in counts.items() for j in range(n)})
    assert seen != sorted(seen, key=lambda x: (x[0], x[1]))  # shuffled, not bucket by bucket


def test_order_is_a_pure_function_of_seed_and_epoch(manifest):
    a, b = planner_for(manifest), planner_for(manifest)
    for epoch in (0, 1):
        pa_, pb = a.plan(epoch), b.plan(epoch)
        assert np.array_equal(pa_.rows, pb.rows) and np.array_equal(pa_.start, pb.start)
    assert micro_batches(a, 0) != micro_batches(a, 1)
    assert micro_batches(a, 0) != micro_batches(planner_for(manifest, "seed=5"), 0)
    # The world size only decides who takes which micro-batch: W = 1 sees them in plan order.
    assert take_epoch(BucketBatchSampler(a, refs=False)) == micro_batches(a, 0)


def test_resume_continues_exactly(manifest):
    planner = planner_for(manifest)
    n0 = planner.num_batches(0) // 2  # steps in epoch 0 at W = 2
    full = BucketBatchSampler(planner, rank=1, world_size=2, refs=False)
    it = iter(full)
    reference = [next(it) for _ in range(n0 + 6)]  # into epoch 1
    for consumed in (3, n0 - 1, n0, n0 + 2):
        resumed = BucketBatchSampler(planner_for(manifest), rank=1, world_size=2, refs=False)
        resumed.load_state_dict(json.loads(json.dumps(full.state_dict_at(consumed))))
        it2 = iter(resumed)
        assert [next(it2) for _ in range(len(reference) - consumed)] == reference[consumed:]
        assert resumed.consumed == len(reference)
    # An old state without an epoch is read as steps at the current world size.
    legacy = BucketBatchSampler(planner, rank=1, world_size=2, refs=False)
    legacy.load_state_dict({"consumed": 4, "seed": 0})
    assert next(iter(legacy)) == reference[4]


def test_elastic_resume_in_process(manifest):
    """2 -> 1 and 1 -> 2 processes: every micro-batch of the epoch exactly once (W = 1 leaves no tail)."""
    planner = planner_for(manifest)
    m = planner.num_batches(0)
    two = [BucketBatchSampler(planner, rank=r, world_size=2, refs=False) for r in range(2)]
    its = [iter(s) for s in two]
    first = [next(it) for _ in range(5) for it in its]  # 5 steps: micro-batches 0..9
    one = BucketBatchSampler(planner, refs=False)
    one.load_state_dict(two[0].state_dict())
    assert two[0].state_dict()["epoch_samples"] == int(planner.plan(0).offsets[10])
    rest = take_epoch(one)
    assert Counter(map(tuple, first + rest)) == Counter(map(tuple, micro_batches(planner, 0)))
    # 1 -> 2 after 7 micro-batches: the two processes continue at 7 and 8, 9 and 10, ...
    one = BucketBatchSampler(planner, refs=False)
    it = iter(one)
    head = [next(it) for _ in range(7)]
    resumed = [BucketBatchSampler(planner, rank=r, world_size=2, refs=False) for r in range(2)]
    for s in resumed:
        s.load_state_dict(one.state_dict())
    tail = [b for s in resumed for b in take_epoch(s)]
    end = 7 + (m - 7) // 2 * 2
    assert Counter(map(tuple, head + tail)) == Counter(map(tuple, micro_batches(planner, 0, 0, end)))


def test_resumable_batch_sampler_order_and_elastic_resume():
    # data.bucket none: epoch e is default_rng([seed, e]).permutation(N); step k of rank r of W takes
    # positions [(k W + r) B, (k W + r + 1) B) -- the original global-batch layout.
    order0 = np.random.default_rng([0, 0]).permutation(10)
    order1 = np.random.default_rng([0, 1]).permutation(10)
    s = ResumableBatchSampler(10, 2, seed=0, rank=1, world_size=2)
    it = iter(s)
    assert [next(it) for _ in range(3)] == [order0[2:4].tolist(), order0[6:8].tolist(), order1[2:4].tolist()]
    assert s.batches_per_epoch == 2 and s.position() == (1, 1)
    # 2 -> 1 after one step (micro-batches 0, 1): one process continues with 2, 3, 4, then epoch 1.
    one = ResumableBatchSampler(10, 2, seed=0)
    one.load_state_dict(ResumableBatchSampler(10, 2, seed=0, world_size=2).state_dict_at(1))
    it = iter(one)
    assert [next(it) for _ in range(4)] == [
        order0[4:6].tolist(),
        order0[6:8].tolist(),
        order0[8:10].tolist(),
        order1[0:2].tolist(),
    ]
    # SampleRefs carry the epoch for the dataset's temporal crop and substitutes.
    refs = ResumableBatchSampler(10, 2, seed=0, refs=True)
    assert next(iter(refs)) == [SampleRef(int(i), -1, 0) for i in order0[:2]]


def test_substitute_index_is_pure_and_stays_in_the_bucket():
    members = np.array([3, 8, 11, 20, 42])
    picks = [substitute_index(7, 2, 11, attempt, members) for attempt in range(40)]
    assert all(p in {3, 8, 20, 42} for p in picks)  # never the failed row itself
    assert len(set(picks)) == 4  # attempts move on to other rows
    assert picks == [substitute_index(7, 2, 11, attempt, members) for attempt in range(40)]
    assert substitute_index(7, 3, 11, 0, members) is not None
    assert substitute_index(7, 2, 11, 0, np.array([11])) is None


# ----------------------------------------------------------------------------- 2 processes (gloo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, manifest: str, tasks: list, out: str) -> None:
    """Rank `rank` of `world`. Each task (state or None, steps; 0 steps: to the end of epoch 0) runs a fresh
    sampler; every rank's batches and rank 0's final state are gathered into `out` (JSON), one per task."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for state, steps in tasks:
            sampler = BucketBatchSampler(planner_for(Path(manifest)), rank=rank, world_size=world, refs=False)
            if state is not None:
                sampler.load_state_dict(state)
            if steps:
                it = iter(sampler)
                mine = [next(it) for _ in range(steps)]
            else:
                mine = take_epoch(sampler)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            results.append({"batches": gathered, "state": sampler.state_dict()})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def as_counter(batches) -> Counter:
    return Counter(tuple(b) for b in batches)


def test_two_gloo_processes_cover_an_epoch_and_resume_elastically(manifest, tmp_path):
    """One spawn of 2 processes runs three tasks: (a) a whole epoch from the start; (b) 6 steps from the
    start, then 1 process resumes (2 -> 1); (c) resume after 9 micro-batches of 1 process (1 -> 2)."""
    planner = planner_for(manifest)
    m = planner.num_batches(0)
    one = BucketBatchSampler(planner, refs=False)
    it = iter(one)
    first9 = [next(it) for _ in range(9)]
    tasks = [(None, 0), (None, 6), (one.state_dict(), 0)]
    out = tmp_path / "out.json"
    mp.spawn(_worker, args=(2, free_port(), str(manifest), tasks, str(out)), nprocs=2, join=True)
    whole, head, tail = json.loads(out.read_text())
    # (a) Disjoint ranks; together the epoch's micro-batches but the last odd one, as one process plans them.
    rank0, rank1 = whole["batches"]
    assert len(rank0) == len(rank1) == m // 2
    assert not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}
    expected = micro_batches(planner, 0, 0, m // 2 * 2)
    assert rank0 == expected[0::2] and rank1 == expected[1::2]
    # (b) 2 -> 1: micro-batches 0..11 by two processes, the rest by one: every batch of the epoch once.
    one = BucketBatchSampler(planner, refs=False)
    one.load_state_dict(head["state"])
    covered = [b for rank in head["batches"] for b in rank] + take_epoch(one)
    assert as_counter(covered) == as_counter(micro_batches(planner, 0))
    # (c) 1 -> 2: two processes continue at micro-batches 9 and 10, 11 and 12, ...
    covered = first9 + [b for rank in tail["batches"] for b in rank]
    end = 9 + (m - 9) // 2 * 2  # the last odd micro-batch cannot give both processes a batch
    assert as_counter(covered) == as_counter(micro_batches(planner, 0, 0, end))
    rows = [i for b in covered for i in b]
    assert len(rows) == len(set(rows))  # no sample twice


# ----------------------------------------------------------------------------- dataset and trainer


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four 16 x 32 clips of 10 frames (real mp4s) and one corrupt file, in one manifest."""
    from frameloom.data.manifest import from_rows, write_manifest
    from media import index_frames, write_video

    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(4):
        write_video(root / f"c{i}.mp4", index_frames(10, 16, 32), fps=24)
        rows.append(
            {
                "path": f"c{i}.mp4",
                "text": f"clip {i}",
                "num_frames": 10,
                "height": 16,
                "width": 32,
                "fps": 24.0,
            }
        )
    (root / "bad.mp4").write_bytes(b"not a video at all" * 10)
    rows.append({"path": "bad.mp4", "text": "bad", "num_frames": 10, "height": 16, "width": 32, "fps": 24.0})
    write_manifest(from_rows(rows), root / "m.parquet")
    return root / "m.parquet"


def test_dataset_decodes_at_bucket_shape_and_substitutes(clips, caplog):
    from frameloom.pipeline import ClipDataset, clip_spec

    # "32px": P = 1024; a 16 x 32 clip (h/w 0.5) has area 512 < 0.8 P, so it lands in "16px" (P = 256),
    # whose sizes all round to 16 x 16; frame count 5 (<= 10 frames), batch 2.
    cfg = load_config(
        None,
        [
            "data.bucket=opensora",
            "data.bucket_config={32px: {5: [1.0, 2]}, 16px: {5: [1.0, 2]}}",
            f"data.manifest={clips}",
            "train.batch_size=2",
        ],
    )
    dataset = ClipDataset(clips, clip_spec(cfg))
    sampler = build_sampler(cfg, dataset)
    batch = next(iter(sampler))
    assert all(isinstance(ref, SampleRef) for ref in batch)
    policy = sampler.planner.policy
    item = dataset[batch[0]]
    assert tuple(item["video"].shape) == (3, *policy.table.shape(batch[0].bucket)) == (3, 5, 16, 16)
    bucket = int(policy.assign(0).bucket[4])
    with caplog.at_level(logging.WARNING, logger="frameloom.data"):
        item = dataset[SampleRef(4, bucket, 0)]  # the corrupt file
    assert item["substituted"] == 1 and item["index"] in {0, 1, 2, 3}
    assert "bad.mp4" in caplog.text
    assert dataset[SampleRef(4, bucket, 0)]["index"] == item["index"]  # the same substitute again
    assert dataset[SampleRef(4, bucket, 1)]["substituted"] == 1
    assert dataset[SampleRef(0, bucket, 0)]["substituted"] == 0


def test_trainer_on_a_bucket_policy_counts_substitutes(clips, tmp_path):
    from frameloom.pipeline import ClipDataset, clip_spec
    from frameloom.train.metrics import read_metrics
    from frameloom.train.trainer import Trainer
    from tiny import TINY

    cfg = load_config(
        None,
        [
            *TINY,
            f"data.manifest={clips}",
            f"run_dir={tmp_path / 'run'}",
            "data.bucket=opensora",
            "data.bucket_config={16px: {5: [[1.0, 0.5], 1], 3: [1.0, 1]}}",
            "train.batch_size=1",
            "train.steps=8",
            "checkpoint.every=0",
            "data.use_cache=never",
        ],
    )
    trainer = Trainer(cfg)
    shapes = []
    original = trainer._micro_step

    def spy(batch, micro):
        shapes.append(tuple(batch["video"].shape))
        return original(batch, micro)

    trainer._micro_step = spy
    result = trainer.fit()
    assert result.step == 8
    assert {s[2] for s in shapes} <= {5, 3} and all(s[3:] == (16, 16) for s in shapes)
    records = read_metrics(tmp_path / "run")
    # The corrupt clip sits in a bucket like any other row: each time it is drawn it is replaced and counted.
    it = iter(build_sampler(cfg, ClipDataset(clips, clip_spec(cfg))))
    drawn = sum(ref.index == 4 for _ in range(8) for ref in next(it))
    assert drawn >= 1
    assert records[-1]["substituted_samples"] == trainer.substituted_samples == drawn
    assert torch.isfinite(torch.tensor([r["loss"] for r in records])).all()
