"""Data parallelism: DDP, or FSDP2 (`fully_shard`) per transformer block then the root (ZeRO-2 / ZeRO-3).

ZeRO stages in FSDP2 terms: parameters, gradients and optimizer state are always sharded over the data mesh
(the optimizer steps on the local shards); `reshard_after_forward=True` frees the gathered parameters after
each block's forward and gathers them again for backward (ZeRO-3), `False` keeps them until backward (ZeRO-2:
less communication, the memory of the full parameters of all blocks during a step).

LoRA (PEFT adapters, base weights frozen) works under both: DDP reduces only parameters with
`requires_grad`, and FSDP2 shards frozen and trainable parameters of a block together (one flat group per
block) and reduces gradients only for the trainable ones. A bf16 frozen base with fp32 adapters inside one
block works (tested in tests/test_family_parallel.py against one process).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from frameloom.config.schema import ParallelConfig
from frameloom.parallel.memory import transformer_blocks


def mixed_precision_policy(p: ParallelConfig, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction; the sharded master weights stay in the model's fp32.

    `auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and tests compare in fp32).
    Forward inputs are not cast (`cast_forward_inputs=False`): FSDP2 would otherwise round every floating
    input of the root and of each block to bf16, the timestep too (t = 0.7371 would reach the sinusoidal
    embedding as 0.7383), so FSDP training and single-device sampling would see different timestep features,
    and RoPE tables would lose precision. The models cast what meets their weights themselves (the DiT to
    its patch-embedding dtype, the family adapters to the transformer's dtype), after the fp32 maths on
    timesteps, positions and pooled text.
    """
    bf16 = p.mixed_precision == "bf16" or (p.mixed_precision == "auto" and device.type == "cuda")
    if bf16:
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, p: ParallelConfig, device: torch.device) -> nn.Module:
    """`fully_shard` each transformer block, then the root (embeddings, final layer), in place.

    `model` may still be on the CPU (the trainer leaves it there): each `fully_shard` call moves only its
    own unit's parameters to the device, keeps this rank's shard and frees the rest, so no device ever holds
    the whole model, and with `cpu_offload` the shards go back to host memory one unit at a time. Once done,
    each rank holds about 1/world of the parameters (tested: tests/test_parallel.py)."""
    kwargs = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(p, device),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")
        if p.cpu_offload
        else OffloadPolicy(),
    }
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away by backward: never reshard them
        reshard = p.zero == 3 and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=p.zero == 3, **kwargs)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap in DDP over the default group (every rank; sp ranks count as data ranks, see `mesh.py`)."""
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # the adaLN/pooled/positional branches are all used; frozen (LoRA base) parameters are ignored anyway
        find_unused_parameters=False,
        # gradients live in the buckets (no extra copy); only trainable parameters are bucketed
        gradient_as_bucket_view=True,
    )
