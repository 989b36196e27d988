"""Block swapping (``parallel.blocks_to_swap: N``): the frozen weights of the last N transformer blocks live in
CPU memory and visit the device only while their block runs, as musubi-tuner's and diffusion-pipe's
``blocks_to_swap`` do.

Schedule (``BlockSwapper``):

1. ``place_on_device`` moves the model to the device except the swapped weights, which stay in (pinned, on
   CUDA) CPU memory: the canonical copy, never written (the weights are frozen, so nothing is copied back).
2. Every submodule of a swapped block that owns swapped weights gets a forward pre-hook: before it computes,
   its block is made resident (``ensure``): a device copy of each swapped weight is made (or the prefetched
   one taken) and ``param.data`` points at it. A pre-hook on the submodules, not on the block, because
   activation checkpointing recomputes a block in backward by calling its class's forward directly (no
   block-level hooks), while its submodules are still called as modules.
3. At most two swapped blocks are resident: the one computing and the one prefetched next; making a block
   resident releases every other (``param.data`` back to the CPU copy: the device copy is freed as soon as
   autograd no longer holds it). The next block is the following one in forward and the previous one while
   backward recomputes blocks in reverse order; on CUDA its copy starts early on a side stream
   (``non_blocking`` from pinned memory) and the compute stream waits for it only when it is needed.

Requirements (checked by ``place_on_device``): the swapped weights must be frozen (a LoRA run; the LoRA
weights and the blocks' own direct parameters, such as ``scale_shift_table``, stay on the device), and
training needs ``parallel.activation_checkpointing: full`` (otherwise autograd keeps every block's device
weights alive for backward and nothing is saved). Not combined with FSDP (which shards the same weights).
tests/test_memory_swap.py checks the schedule on CPU: every swapped block is a device copy exactly while it
computes, outputs and gradients equal the unswapped model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frameloom.config.schema import ParallelConfig
from frameloom.errors import FrameloomError

__all__ = ["BlockSwapper", "place_on_device"]


class BlockSwapper:
    """Swaps the frozen submodule weights of ``blocks`` between CPU memory and ``device`` (module docstring).

    ``trace`` (when given a list) receives ``("in", i)`` / ``("out", i)`` events, i = index in ``blocks``.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device, trace: list | None = None):
        self.blocks = blocks
        self.device = torch.device(device)
        self.trace = trace
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # per block: [(param, cpu copy)]
        self.weights: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        self.resident: dict[int, list[torch.Tensor]] = {}  # block -> device copies
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.last: int | None = None
        self.handles = []
        for i, block in enumerate(blocks):
            owned = []
            for module in block.modules():
                if module is block:
                    continue  # the block's direct parameters stay on the device
                params = [p for p in module.parameters(recurse=False) if not p.requires_grad]
                if not params:
                    continue
                owned += params
                self.handles.append(module.register_forward_pre_hook(self._hook(i)))
            pinned = [(p, self._host_copy(p.data)) for p in owned]
            for p, host in pinned:
                p.data = host
            self.weights.append(pinned)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to("cpu")
        return host.pin_memory() if self.cuda else host

    def _hook(self, i: int) -> Callable:
        def pre_hook(module, args):
            self.ensure(i)

        return pre_hook

    def _copy_in(self, i: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Start the device copies of block ``i`` (on the side stream on CUDA)."""
        if not self.cuda:  # a distinct copy, so "resident" is observable on CPU too
            return [host.to(self.device, copy=True) for _, host in self.weights[i]], None
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for _, host in self.weights[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def ensure(self, i: int) -> None:
        """Make block ``i`` resident (its device copies in place), keep at most it and its successor in the
        current direction resident, and start fetching that successor."""
        if i not in self.resident:
            copies, event = self.pending.pop(i, None) or self._copy_in(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                for c in copies:  # used on the compute stream: not reusable before it is done there
                    c.record_stream(torch.cuda.current_stream(self.device))
            for (p, _), copy in zip(self.weights[i], copies):
                p.data = copy
            self.resident[i] = copies
            if self.trace is not None:
                self.trace.append(("in", i))
        step = -1 if self.last is not None and i < self.last else 1  # backward recomputes in reverse
        self.last = i
        nxt = i + step
        if nxt == len(self.blocks) and torch.is_grad_enabled():
            nxt = i - 1  # the forward's last block: backward recomputes the blocks before it next
        for j in [j for j in self.resident if j != i]:
            self.release(j)
        for j in [j for j in self.pending if j != nxt]:
            del self.pending[j]
        if 0 <= nxt < len(self.blocks) and nxt not in self.pending:
            self.pending[nxt] = self._copy_in(nxt)

    def release(self, i: int) -> None:
        """Point block ``i``'s swapped weights back at their CPU copies (the device copies are freed once
        autograd no longer holds them)."""
        if self.resident.pop(i, None) is None:
            return
        for p, host in self.weights[i]:
            p.data = host
        if self.trace is not None:
            self.trace.append(("out", i))

    def release_all(self) -> None:
        for i in list(self.resident):
            self.release(i)
        self.pending.clear()
        self.last = None

    def device_bytes(self) -> int:
        """Bytes of swapped weights now on the device (resident and prefetched)."""
        copies = [c for cs in self.resident.values() for c in cs]
        copies += [c for cs, _ in self.pending.values() for c in cs]
        return sum(c.numel() * c.element_size() for c in copies)


def _move_except(model: nn.Module, device: torch.device, keep: set[int]) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` except the parameters in ``keep`` (ids)."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in keep:
                p.data = p.data.to(device)
                if p.grad is not None:
                    p.grad.data = p.grad.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)


def place_on_device(
    model: nn.Module,
    device: torch.device | str,
    p: ParallelConfig,
    *,
    training: bool = True,
    trace: list | None = None,
) -> BlockSwapper | None:
    """``model.to(device)``, or with ``p.blocks_to_swap = N`` everything but the frozen weights of the last N
    transformer blocks, which a ``BlockSwapper`` brings in while they run (returned; None without swapping).
    ``training`` checks what training needs (activation checkpointing)."""
    device = torch.device(device)
    n = int(p.blocks_to_swap)
    if n <= 0:
        model.to(device)
        return None
    from frameloom.parallel.memory import transformer_blocks

    if p.data_parallel == "fsdp":
        raise FrameloomError("parallel.blocks_to_swap does not combine with data_parallel: fsdp")
    if training and p.activation_checkpointing != "full":
        raise FrameloomError(
            "parallel.blocks_to_swap needs parallel.activation_checkpointing: full (without it autograd keeps "
            "every block's weights on the device for backward)"
        )
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise FrameloomError(f"parallel.blocks_to_swap={n}, but the model has {len(blocks)} blocks")
    swapped = blocks[len(blocks) - n :]
    if not any(not q.requires_grad for b in swapped for q in b.parameters()):
        raise FrameloomError(
            "parallel.blocks_to_swap swaps a frozen base: it needs a LoRA (model.lora.rank > 0)"
        )
    keep = {  # what BlockSwapper swaps: frozen weights of the blocks' submodules
        id(q)
        for b in swapped
        for m in b.modules()
        if m is not b
        for q in m.parameters(recurse=False)
        if not q.requires_grad
    }
    _move_except(model, device, keep)
    return BlockSwapper(swapped, device, trace)
