"""Memory savers applied from outside a model: activation checkpointing, activation offload, compile.

Checkpointing and compile act per transformer block and leave parameter names unchanged (no wrapper module,
unlike `checkpoint_wrapper`), so checkpoints, EMA and LoRA keys are the same with and without them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from frameloom.config.schema import ParallelConfig
from frameloom.errors import FrameloomError

# Names of block lists, in (joint/double, single) order: frameloom's DiT and Wan (`blocks`), diffusers' Flux,
# HunyuanVideo, CogVideoX, LTX (`transformer_blocks`, `single_transformer_blocks`), Open-Sora 2's MMDiT
# (`double_blocks`, `single_blocks`).
BLOCK_LISTS = (
    ("double_blocks", "single_blocks"),
    ("transformer_blocks", "single_transformer_blocks"),
    ("blocks",),
)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's transformer-block lists: [joint/double blocks, single blocks] or [blocks]."""
    for names in BLOCK_LISTS:
        found = [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.ModuleList)]
        if found and isinstance(getattr(model, names[0], None), nn.ModuleList):
            return found
    raise FrameloomError(
        f"{type(model).__name__} has no transformer-block list ({', '.join(sum(BLOCK_LISTS, ()))})"
    )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """All transformer blocks, in forward order (the units of FSDP, checkpointing and compile)."""
    return [b for blocks in block_lists(model) for b in blocks]


def select_checkpointed(counts: list[int], p: ParallelConfig) -> list[list[bool]]:
    """Which blocks to checkpoint, per block list of lengths `counts`.

    `full`: every block. `selective`: the first `checkpoint_blocks` blocks (counted over all lists in forward
    order), or every `checkpoint_every`-th block (1-based: blocks k, 2k, ...), or Open-Sora 2's
    `(double, single)`: the first `double` blocks of the first list and the first `single` of the second (a
    model with one block list takes `double` of it; `single` must then be 0).
    """
    mode = p.activation_checkpointing
    if mode == "none":
        return [[False] * n for n in counts]
    if mode == "full":
        return [[True] * n for n in counts]
    if p.opensora_grad_ckpt is not None:
        double, single = p.opensora_grad_ckpt
        if len(counts) == 1 and single:
            raise FrameloomError(
                "parallel.opensora_grad_ckpt: this model has one block list; use [N, 0] to checkpoint N blocks"
            )
        firsts = [double, single][: len(counts)]
        return [[i < k for i in range(n)] for n, k in zip(counts, firsts)]
    flat = [
        (p.checkpoint_blocks and i < p.checkpoint_blocks)
        or (p.checkpoint_every and (i + 1) % p.checkpoint_every == 0)
        for i in range(sum(counts))
    ]
    out, start = [], 0
    for n in counts:
        out.append([bool(x) for x in flat[start : start + n]])
        start += n
    return out


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's own forward, recomputed in backward instead of keeping its activations (non-reentrant)."""
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module) -> None:
    """Make `block` recompute its activations in backward (in place; a bound method, so deepcopy rebinds it)."""
    block.forward = types.MethodType(_checkpointed_forward, block)


def apply_activation_checkpointing(model: nn.Module, p: ParallelConfig) -> int:
    """Checkpoint the blocks `select_checkpointed` picks; returns how many."""
    lists = block_lists(model)
    chosen = select_checkpointed([len(b) for b in lists], p)
    n = 0
    for blocks, flags in zip(lists, chosen):
        for block, flag in zip(blocks, flags):
            if flag:
                checkpoint_block(block)
                n += 1
    return n


def compile_unavailable(device_type: str, backend: str = "inductor") -> str | None:
    """Why torch.compile's `backend` cannot build kernels for `device_type` here, or None when it can.

    Inductor writes C++ for the CPU (a compiler named by $CXX, else g++) and Triton kernels for CUDA; without
    them compilation fails at the first forward, deep inside a training step, so this is checked up front."""
    if backend != "inductor":
        return None
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) on PATH for inductor's CPU kernels"


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block in place (`nn.Module.compile` keeps parameter names)."""
    for block in transformer_blocks(model):
        block.compile(backend=backend)


@contextlib.contextmanager
def offload_activations(enabled: bool, pin_memory: bool) -> Iterator[None]:
    """While active, tensors autograd saves for backward live in CPU memory (moved back in backward)."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        yield
