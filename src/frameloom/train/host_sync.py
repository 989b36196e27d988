"""Counting the host's reads of tensor values (the points where a GPU run would wait for the device).

On CUDA `torch.cuda.set_sync_debug_mode("warn")` reports every synchronizing call; on CPU nothing
synchronizes, so `count_host_reads` counts the calls that would: `.item()`, `.tolist()`, `bool()`,
`float()`, `int()` of a tensor and `.nonzero()`. Used by benchmarks/train_step.py and the tests that hold the
training loop to zero reads between logging steps.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator

import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


class HostReads:
    """Counts per kind while `active` (a flag the caller toggles around the code to measure)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Patch `torch.Tensor`'s value-reading methods to count calls made while `HostReads.active`."""
    reads = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if reads.active:
                reads.counts[name] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(name, fn))
    try:
        yield reads
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
