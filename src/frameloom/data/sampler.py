"""A deterministic, resumable batch sampler.

The order of an epoch is a pure function of (seed, epoch); the sampler's whole state is the number of global
batches consumed, so a resumed run continues exactly where it stopped. Each global batch is split into
`world_size` contiguous per-rank slices, so ranks get disjoint samples. (The bucketed, elastic version of
this comes with the dialects issue; it keeps this state format.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ResumableBatchSampler:
    """Yields lists of row indices for this rank; the last incomplete global batch of an epoch is dropped."""

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} processes"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.consumed = 0  # global batches handed out so far, across epochs

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all sample indices for `epoch` (numpy PCG64 seeded by (seed, epoch))."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def position(self) -> tuple[int, int]:
        """(epoch, global batch index within the epoch) of the next batch."""
        return divmod(self.consumed, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, b = self.position()
            order = self.epoch_order(epoch)
            global_size = self.batch_size * self.world_size
            for batch in range(b, self.batches_per_epoch):
                start = batch * global_size + self.rank * self.batch_size
                self.consumed += 1
                yield order[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
