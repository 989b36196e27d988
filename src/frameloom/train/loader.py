"""The training DataLoader and what its worker processes do when they start.

Workers ignore SIGTERM and SIGINT. torchrun stops a job by signalling each rank's whole process group, so the
loader workers receive the SIGTERM too; if they died of it, the rank would raise "DataLoader worker exited
unexpectedly" before it could save. Ignoring it leaves preemption to the trainer (flag -> checkpoint -> exit
0), which shuts its workers down on the way out. Workers still end with their parent: the kernel kills a
worker whose rank died (`die_with_parent`; the DataLoader's own watchdog would take up to 5 s), and with it
the worker's decode sandbox (data/sandbox.py).

Small tensors leave a worker inside the batch's pickle (`SmallTensorsByValue`). torch sends every tensor
storage through shared memory, and the receiving process pays a socket handshake per storage (~3 ms each
here: 6 storages made ~18 ms of a 90 ms step on the digits preset, measured with cProfile); a copy of a few
kilobytes costs microseconds. Tensors above `BY_VALUE_MAX_BYTES` (video latents) still go through shared
memory.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit hook now, so that ours runs before it)
import signal
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from frameloom.config.schema import DataConfig
from frameloom.parallel.env import die_with_parent

#: Tensors up to this size travel from a loader worker inside the pickle; larger ones through shared memory.
BY_VALUE_MAX_BYTES = 1 << 20


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor `_ByValue` pickled (rebuilt in the receiving process: a writable copy of the bytes)."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


class _ByValue:
    """A tensor that pickles as its bytes and unpickles as a plain tensor (not a shared-memory handle)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, tuple[bytes, torch.dtype, tuple[int, ...]]]:
        flat = self.tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bf16 included
        return _tensor_from_bytes, (flat.numpy().tobytes(), self.tensor.dtype, tuple(self.tensor.shape))


def _by_value_if_small(leaf: Any) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return leaf
    plain = leaf.device.type == "cpu" and leaf.layout == torch.strided and not leaf.requires_grad
    return _ByValue(leaf) if plain and leaf.nbytes <= BY_VALUE_MAX_BYTES else leaf


def _small_by_value(batch: Any) -> Any:
    """`batch` with its small tensors marked, in any nesting of dicts, lists and (named) tuples."""
    return tree_map(_by_value_if_small, batch)


class SmallTensorsByValue:
    """Wraps a collate function: in a loader worker, the batch's small tensors are marked to travel inside
    the pickle (the main process receives ordinary tensors); in the main process (0 workers) the batch is
    returned as collated. A class, not a closure, so that spawned workers can unpickle it."""

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> Any:
        batch = self.collate_fn(items)
        return _small_by_value(batch) if torch.utils.data.get_worker_info() is not None else batch


def worker_init(worker_id: int) -> None:  # noqa: ARG001  (DataLoader's worker_init_fn signature)
    """Runs first in every loader worker: stop signals are the main process's business (module docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def kill_loader_workers() -> None:
    """Kill this process's daemonic children (loader workers) still alive; registered to run at exit.
    multiprocessing's own exit hook SIGTERMs its daemonic children and then joins them; loader workers ignore
    SIGTERM, so a loader iterator that outlives its run (kept alive by a traceback, say) would hang the
    interpreter's exit forever. SIGKILL ends them as multiprocessing means to (torch's SIGCHLD handler, which
    would raise "worker killed" into this hook, is reset first)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


def build_loader(
    dataset: Dataset,
    batch_sampler: Any,
    collate_fn: Callable[[list], Any],
    data: DataConfig,
    device: torch.device,
) -> DataLoader:
    """The loader of a run: `data.num_workers` workers (persistent, `prefetch_factor` batches ahead each),
    page-locked batches when training on CUDA (so the trainer's host-to-device copies are asynchronous)."""
    workers = max(0, int(data.num_workers))
    extra: dict[str, Any] = {}
    if workers > 0:
        # once, and after multiprocessing's exit hook (imported above), so that ours runs first
        atexit.unregister(kill_loader_workers)
        atexit.register(kill_loader_workers)
        extra = dict(
            worker_init_fn=worker_init,
            persistent_workers=bool(data.persistent_workers),
            prefetch_factor=max(1, int(data.prefetch_factor)),
        )
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=SmallTensorsByValue(collate_fn),  # a no-op without workers
        num_workers=workers,
        pin_memory=bool(data.pin_memory) and device.type == "cuda",
        **extra,
    )
