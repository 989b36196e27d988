"""SIGTERM (cluster preemption) as a flag, and the ranks' agreement on it without a device sync.

torchrun and SLURM deliver SIGTERM to every rank, but not at the same instant, so the ranks must agree on the
step after which they all save. One process reads its own flag. Many processes all-reduce (MAX) the flag of
step k on a CPU (gloo) group asynchronously and read the result at step k + 1: the network round trip hides
behind a step, the device is never synchronized, and every rank stops after the same step, at most one step
after the signal (a SIGTERM save must fit torchrun's grace period, 30 s by default: docs/parallel.md).
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (a context manager)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StopPoll:
    """Agreement on a per-rank stop flag, one step late and without blocking on the device.

    `poll(flag)` returns the MAX over ranks of the flags passed to the previous `poll` (False on the first
    call) and starts the reduction of `flag`. Every rank must call it at the same points of the loop.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group  # None: one process (the flag is its own decision, at once)
        self._work: Any = None
        self._value = torch.zeros(1, dtype=torch.int32)

    def poll(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._value.item())  # a CPU tensor: no device sync
        self._value = torch.tensor([int(flag)], dtype=torch.int32)
        self._work = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Complete an outstanding reduction (every rank calls this at the same point)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
