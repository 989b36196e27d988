"""Peak tensor memory of a piece of PyTorch code, on any device including ``meta``.

``LiveBytes`` is a ``TorchDispatchMode`` that sees every tensor an operator returns, counts each distinct
storage once while any tensor (or autograd's saved copy) still refers to it, and records the peak of that
sum. Run on the ``meta`` device it measures a training step of a model too large for the machine without
allocating anything (shapes and dtypes are all it needs); run on the CPU it counts what the allocator is
asked for (tests/test_memory_plan.py compares it with the profiler's allocation timeline).

Storages that exist before the mode is entered (parameters, buffers, inputs) are not counted: an output that
aliases an input (a view, an in-place result, as the operator's schema says) only extends the life of a
storage counted already. Storage identity is the storage object's C pointer (``_cdata``), not ``data_ptr``
(which is 0 for every meta tensor); a weakref finalizer on each tensor releases its share when it dies.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "storage_bytes"]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (parameters sharing a storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` -> ``m.peak`` (bytes), ``m.current``; ``m.mark(name)`` records the live
    bytes at a point (``m.marks``)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.marks: dict[str, int] = {}
        self._refs: dict[int, list] = {}  # storage key -> [bytes, live tensor count]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._refs[key]

    def _track(self, t: torch.Tensor, aliases_input: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is None:
            if aliases_input:  # a view of a storage from before the mode: not ours to count
                return
            entry = self._refs[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat = tree_flatten(out)[0]
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                aliased = i < len(returns) and returns[i].alias_info is not None
                self._track(t, aliased)
        return out

    def mark(self, name: str) -> None:
        self.marks[name] = self.current
