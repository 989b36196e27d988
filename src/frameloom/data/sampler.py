"""Deterministic, resumable, distributed batch samplers.

An epoch's order is a pure function of (seed, epoch) and never of the number of processes: it is a sequence
of per-process batches ("micro-batches"); at step k, process r of W takes micro-batch ``k * W + r``. So
ranks get disjoint batches, and a position in the epoch (micro-batches, or equivalently samples, consumed)
means the same thing whatever W was. A run resumed with another number of processes continues at that
position and neither repeats nor skips a sample of the current epoch. The last ``M mod W`` micro-batches
of an epoch, which cannot give every process a batch, are left out of that epoch.

- ``ResumableBatchSampler`` (``data.bucket: none``): one shape; micro-batch m of epoch e is positions
  ``[m * B, (m + 1) * B)`` of a permutation seeded by (seed, epoch).
- ``BucketBatchSampler`` (any other policy): every micro-batch holds samples of one bucket (one shape).
  Epoch plan: the policy's assignment for the epoch; rows of each bucket in a seeded random order, cut into
  whole batches of the bucket's batch size (the remainder sits out this epoch); each bucket's batches
  grouped into megabatches of ``data.megabatch`` consecutive batches; the megabatch order shuffled.

State (``state_dict``): ``consumed`` (steps taken, the trainer's counter) plus ``epoch``, ``epoch_samples``
(samples of the epoch's order consumed by all processes) and ``world_size``. A state without ``epoch``
(older checkpoints) is read as ``consumed`` steps at the current number of processes.

Decode failures: ``substitute_index`` picks a replacement from the same bucket as a pure function of
(seed, epoch, index, attempt), so a resumed run draws the same substitutes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from frameloom.data.buckets import (
    STREAM_SUBSTITUTE,
    BucketPolicy,
    build_policy,
    read_columns,
    stream_key,
    uniform,
)
from frameloom.errors import FrameloomError


class SampleRef(NamedTuple):
    """What a bucketed sampler hands the dataset for one sample: the row, its bucket and the epoch."""

    index: int
    bucket: int
    epoch: int


def substitute_index(seed: int, epoch: int, index: int, attempt: int, members: np.ndarray) -> int | None:
    """A replacement for row ``index`` that failed to decode: ``members[floor(u * n)]`` over the other rows
    of its bucket (``members`` ascending), u = ``uniform(key(seed, epoch, SUBSTITUTE), index, attempt)``.

    A pure function of its arguments; None when the bucket has no other row.
    """
    others = members[members != index]
    if others.size == 0:
        return None
    u = uniform(stream_key(seed, epoch, STREAM_SUBSTITUTE), np.array([index]), attempt)[0]
    return int(others[min(int(u * others.size), others.size - 1)])


class _Position:
    """Maps steps consumed (at this sampler's world size) to (epoch, micro-batch index), from an anchor."""

    def __init__(self, world_size: int, batches_in: Any):
        self.world_size = world_size
        self.batches_in = batches_in  # epoch -> micro-batches in that epoch
        self.anchor = (0, 0, 0)  # (consumed, epoch, micro-batch) known to correspond

    def locate(self, consumed: int) -> tuple[int, int]:
        base, epoch, m = self.anchor
        if consumed < base:
            raise ValueError(f"position {consumed} is before the resumed position {base}")
        steps = consumed - base
        while True:
            total = self.batches_in(epoch)
            if total < self.world_size and m == 0:
                raise FrameloomError(
                    f"epoch {epoch} has {total} batch(es), fewer than the {self.world_size} processes: "
                    "lower train.batch_size or use more data"
                )
            available = (total - m) // self.world_size
            if steps < available:
                return epoch, m + steps * self.world_size
            steps -= available
            epoch, m = epoch + 1, 0


class _StepState:
    """The resumable state both samplers share: steps handed out (``consumed``), anchored on load to
    (epoch, samples consumed in that epoch) so that another number of processes resumes at the same sample.
    Subclasses set ``seed``, ``world_size``, ``consumed``, ``_pos`` and map micro-batches to samples."""

    def _samples_before(self, epoch: int, m: int) -> int:
        """Samples of ``epoch`` in its first ``m`` micro-batches."""
        raise NotImplementedError

    def _first_unconsumed(self, epoch: int, samples: int) -> int:
        """The first micro-batch of ``epoch`` not covered by its first ``samples`` samples."""
        raise NotImplementedError

    def state_dict_at(self, consumed: int) -> dict[str, int]:
        """The state after ``consumed`` steps (the trainer passes the steps its loop took)."""
        epoch, m = self._pos.locate(consumed)
        return {
            "consumed": int(consumed),
            "seed": self.seed,
            "epoch": epoch,
            "epoch_samples": self._samples_before(epoch, m),
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, int]:
        return self.state_dict_at(self.consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
        if "epoch" in state:
            epoch = int(state["epoch"])
            self._pos.anchor = (
                self.consumed,
                epoch,
                self._first_unconsumed(epoch, int(state["epoch_samples"])),
            )
        else:
            self._pos.anchor = (0, 0, 0)


class ResumableBatchSampler(_StepState):
    """``data.bucket: none``: yields lists of row indices for this rank; see the module docstring."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        refs: bool = False,
    ):
        if num_samples < batch_size * world_size:
            raise FrameloomError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} processes: "
                "lower train.batch_size or use more data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.refs = refs  # yield SampleRef(row, -1, epoch) instead of row indices
        self.consumed = 0  # steps (one batch per process) handed out so far, across epochs
        self._pos = _Position(world_size, lambda epoch: self.micro_batches)

    @property
    def micro_batches(self) -> int:
        """Per-process batches in an epoch, whatever the number of processes."""
        return self.num_samples // self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all sample indices for `epoch` (numpy PCG64 seeded by (seed, epoch))."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def position(self) -> tuple[int, int]:
        """(epoch, step index within the epoch) of the next batch (exact when the world size never changed)."""
        epoch, m = self._pos.locate(self.consumed)
        return epoch, m // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch, m = self._pos.locate(self.consumed)
        while True:
            order = self.epoch_order(epoch)
            while m + self.world_size <= self.micro_batches:
                start = (m + self.rank) * self.batch_size
                self.consumed += 1
                m += self.world_size
                rows = order[start : start + self.batch_size].tolist()
                yield [SampleRef(i, -1, epoch) for i in rows] if self.refs else rows
            epoch, m = epoch + 1, 0

    def _samples_before(self, epoch: int, m: int) -> int:
        return m * self.batch_size

    def _first_unconsumed(self, epoch: int, samples: int) -> int:
        return -(-samples // self.batch_size)


@dataclass
class EpochPlan:
    """One epoch's micro-batches in order: micro-batch t is ``rows[start[t] : start[t] + size[t]]``."""

    rows: np.ndarray  # (S,) int64 row indices grouped by bucket
    start: np.ndarray  # (M,) int64
    size: np.ndarray  # (M,) int64
    bucket: np.ndarray  # (M,) int32
    offsets: np.ndarray  # (M + 1,) int64 samples before micro-batch t in the epoch's order
    assignment: np.ndarray  # (N,) int32 bucket of every row this epoch (-1: sits out)

    @property
    def num_batches(self) -> int:
        return len(self.start)

    def batch(self, t: int) -> np.ndarray:
        return self.rows[self.start[t] : self.start[t] + self.size[t]]


class EpochPlanner:
    """Builds (and caches) epoch plans for a policy; the order never depends on the number of processes."""

    def __init__(self, policy: BucketPolicy, seed: int, megabatch: int = 1, cache: int = 2):
        if megabatch < 1:
            raise FrameloomError(f"data.megabatch must be >= 1, got {megabatch}")
        self.policy = policy
        self.seed = int(seed)
        self.megabatch = megabatch
        self._cache: OrderedDict[int, EpochPlan] = OrderedDict()
        self._cache_size = cache
        self._counts: dict[int, int] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # DataLoader workers rebuild what they need
        return state

    def plan(self, epoch: int) -> EpochPlan:
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        plan = self._build(epoch)
        self._cache[epoch] = plan
        self._counts[epoch] = plan.num_batches
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return plan

    def num_batches(self, epoch: int) -> int:
        if epoch not in self._counts:
            self.plan(epoch)
        return self._counts[epoch]

    def members(self, epoch: int, bucket: int) -> np.ndarray:
        """Rows assigned to ``bucket`` in ``epoch`` (ascending)."""
        return np.flatnonzero(self.plan(epoch).assignment == bucket)

    def _build(self, epoch: int) -> EpochPlan:
        table = self.policy.table
        k = len(table)
        assignment = self.policy.assign(epoch).bucket
        rng = np.random.default_rng([self.seed, epoch, 0xB0C7])
        # 1. Rows of each bucket in random order: permute, then a stable sort by bucket (int16: radix sort).
        kept = np.flatnonzero(assignment >= 0)
        kept = kept[rng.permutation(kept.size)]
        of = assignment[kept]
        rows = kept[np.argsort(of.astype(np.int16) if k < 2**15 else of, kind="stable")]
        # 2. Whole micro-batches per bucket; the remainder sits out this epoch.
        counts = np.bincount(of, minlength=k)
        batch = table.batch_size
        n_mb = counts // batch
        first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
        mb_bucket = np.repeat(np.arange(k), n_mb)
        mb_local = np.arange(mb_bucket.size) - np.repeat(np.cumsum(n_mb) - n_mb, n_mb)
        mb_start = first_row[mb_bucket] + mb_local * batch[mb_bucket]
        # 3. Megabatches of `megabatch` consecutive micro-batches of one bucket; shuffle their order.
        n_mega = -(-n_mb // self.megabatch)
        mega = (np.cumsum(n_mega) - n_mega)[mb_bucket] + mb_local // self.megabatch
        perm = rng.permutation(int(n_mega.sum()))  # position i of the epoch holds megabatch perm[i]
        per_mega = np.bincount(mega, minlength=perm.size)  # micro-batches in each megabatch
        first_mb = (np.cumsum(per_mega) - per_mega)[perm]
        length = per_mega[perm]
        # (M,) micro-batches in epoch order: megabatch perm[0]'s run, then perm[1]'s, ... (no sort needed)
        final = np.repeat(first_mb - (np.cumsum(length) - length), length) + np.arange(int(length.sum()))
        size = batch[mb_bucket[final]]
        return EpochPlan(
            rows=rows,
            start=mb_start[final],
            size=size,
            bucket=mb_bucket[final].astype(np.int32),
            offsets=np.concatenate([[0], np.cumsum(size)]),
            assignment=assignment,
        )


class BucketBatchSampler(_StepState):
    """A bucket policy's batches for one rank: lists of ``SampleRef`` (or of row indices)."""

    def __init__(
        self,
        planner: EpochPlanner,
        *,
        rank: int = 0,
        world_size: int = 1,
        refs: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.planner = planner
        self.seed = planner.seed
        self.rank = rank
        self.world_size = world_size
        self.refs = refs
        self.consumed = 0
        self._pos = _Position(world_size, planner.num_batches)

    def position(self) -> tuple[int, int]:
        """(epoch, micro-batch index) of the next step's first micro-batch."""
        return self._pos.locate(self.consumed)

    def prepare(self) -> None:
        """Build the plan of the epoch the next batch comes from (so the first batch is immediate)."""
        self.planner.plan(self.position()[0])

    def __iter__(self) -> Iterator[list]:
        epoch, m = self.position()
        while True:
            plan = self.planner.plan(epoch)
            while m + self.world_size <= plan.num_batches:
                t = m + self.rank
                rows = plan.batch(t).tolist()
                self.consumed += 1
                m += self.world_size
                if self.refs:
                    bucket = int(plan.bucket[t])
                    yield [SampleRef(i, bucket, epoch) for i in rows]
                else:
                    yield rows
            epoch, m = epoch + 1, 0

    def _samples_before(self, epoch: int, m: int) -> int:
        return int(self.planner.plan(epoch).offsets[m])

    def _first_unconsumed(self, epoch: int, samples: int) -> int:
        return int(np.searchsorted(self.planner.plan(epoch).offsets, samples, side="left"))


def build_sampler(
    cfg: Any, dataset: Any, rank: int = 0, world_size: int = 1, policy: BucketPolicy | None = None
):
    """The trainer's sampler for ``cfg.data.bucket``; tells a dataset with ``use_buckets`` about the policy.

    ``none``: ``ResumableBatchSampler`` over ``len(dataset)``. Otherwise the policy (``policy``, or built
    from the manifest's columns) drives a ``BucketBatchSampler`` that yields ``SampleRef`` lists to a dataset
    with ``use_buckets`` (``ClipDataset`` decodes at the bucket's shape, ``CachedClipDataset`` reads the
    bucket's entry), plain indices to one without.
    """
    batch = cfg.train.batch_size
    if len(dataset) == 0:
        raise FrameloomError(f"data.manifest {cfg.data.manifest} has no rows: prepare a data set first")
    if cfg.data.frame_policy is not None and cfg.data.bucket == "none" and batch > 1:
        raise FrameloomError(
            f"data.frame_policy={cfg.data.frame_policy} gives clips of different lengths, which data.bucket=none "
            f"cannot batch (train.batch_size={batch}): set a bucket policy (e.g. data.bucket=temporal or "
            "opensora_plan), train.batch_size=1, or data.frame_policy=null"
        )
    if cfg.data.bucket == "none":
        refs = hasattr(dataset, "use_buckets")
        if refs:
            dataset.use_buckets(None, seed=cfg.seed)
        # refs carry the epoch for per-epoch draws; a dataset without any (the cache) gets plain row indices
        refs = refs and getattr(dataset, "draws_per_epoch", True)
        return ResumableBatchSampler(
            len(dataset), batch, seed=cfg.seed, rank=rank, world_size=world_size, refs=refs
        )
    if policy is None:
        if not cfg.data.manifest:
            raise FrameloomError("data.manifest is not set (pass data.manifest=PATH)")
        policy = build_policy(cfg, read_columns(cfg.data.manifest))
    planner = EpochPlanner(policy, cfg.seed, cfg.data.megabatch)
    refs = hasattr(dataset, "use_buckets")
    if refs:
        dataset.use_buckets(planner, seed=cfg.seed)
    else:
        logging.getLogger("frameloom.data").warning(
            "data.bucket=%s with a dataset that cannot decode at bucket shapes: batches follow the policy's "
            "buckets, but every clip has the dataset's own shape",
            cfg.data.bucket,
        )
    sampler = BucketBatchSampler(planner, rank=rank, world_size=world_size, refs=refs)
    sampler.prepare()
    return sampler
