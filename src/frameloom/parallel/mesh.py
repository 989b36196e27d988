"""Device meshes with named axes, built from a `ParallelPlan` (collective: every rank calls these in order)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from frameloom.parallel.plan import MESH_AXES, ParallelPlan


def build_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """The 3-D mesh `(dp_replicate, dp_shard, sp)`; `mesh["sp"]` is this rank's sequence-parallel group."""
    return init_device_mesh(device_type, plan.mesh_shape, mesh_dim_names=MESH_AXES)


def data_parallel_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """The mesh gradients are reduced over: every rank, as `(dp_shard x sp)` or `(dp_replicate, dp_shard x sp)`.

    Ranks of one sp group hold partial gradients of the same batch (each from its own token shard), so they
    take part in the data-parallel reduction like extra shard ranks (torchtitan flattens `dp_shard` and `cp`
    the same way); the trainer multiplies the loss by `sp` so that the reduction's mean over them is a sum.
    With `dp_replicate > 1` FSDP2 shards over the second axis and replicates over the first (HSDP).
    """
    ranks = torch.arange(plan.world_size)
    if plan.dp_replicate > 1:
        shape = (plan.dp_replicate, plan.dp_shard * plan.sp)
        return DeviceMesh(device_type, ranks.view(*shape), mesh_dim_names=("dp_replicate", "dp_shard_sp"))
    return DeviceMesh(device_type, ranks, mesh_dim_names=("dp_shard_sp",))


def sp_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """This rank's sequence-parallel process group (None without a mesh or with sp = 1)."""
    if mesh is None or mesh["sp"].size() == 1:
        return None
    return mesh["sp"].get_group()
