"""Process setup from torchrun's environment, process hygiene, and the few collectives the rest of frameloom
needs.

torchrun (single node, or many nodes through its c10d rendezvous) sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each process. `init_distributed` reads them and joins the
default process group: NCCL for CUDA, gloo for CPU. A plain `python -m frameloom ...` (WORLD_SIZE unset or 1)
stays a single process and never touches torch.distributed, so nothing here costs anything there.

Process hygiene: no frameloom process outlives the one that started it. A rank asks the kernel for SIGKILL
when its launcher dies (`die_with_parent`, Linux prctl PR_SET_PDEATHSIG), and so do its loader workers and
their decode sandboxes (data/sandbox.py), so killing torchrun leaves no orphan that could still write a
checkpoint. A rank that dies makes the others' next collective fail: at once under gloo (the connection
closes), after `parallel.timeout_s` under NCCL (the process group's timeout); torchrun then stops the rest.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from frameloom.errors import FrameloomError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global rank, the world size, its rank on the node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise FrameloomError(f"environment variable {name}={value!r} is not an integer") from None


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent exits (Linux; elsewhere a no-op returning
    False). `parent_pid`: the parent this process started under; if it is already gone (it died before the
    request was made), the signal is raised now. Inherited by neither fork nor exec: each process asks."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def default_backend(device_type: str, *, cpu_collectives: bool = False) -> str:
    """The process group's backend: gloo on CPU; NCCL on CUDA, with gloo beside it for CPU tensors
    (`cuda:nccl,cpu:gloo`) when `cpu_collectives` (FSDP CPU offload: gradient norms of CPU shards)."""
    if device_type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"


def init_distributed(
    device: torch.device | str = "cpu", *, backend: str | None = None, timeout_s: float | None = None
) -> DistEnv:
    """Join the default process group when WORLD_SIZE > 1 (or one is already initialised).

    `device` is the configured device type (`cpu` or `cuda`); on CUDA each process takes GPU LOCAL_RANK.
    `backend` overrides the choice (`default_backend`: NCCL on CUDA, gloo on CPU), e.g. gloo for CPU-only
    collectives, `cuda:nccl,cpu:gloo` for both.
    `timeout_s` bounds every collective (`parallel.timeout_s`; None: PyTorch's default), so a rank whose
    peer died or hangs gives up instead of waiting forever. A process started by a launcher (WORLD_SIZE > 1)
    dies with it (`die_with_parent`). Idempotent: a second call returns the same environment.
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if world > 1:
            if not dist.is_available():
                raise FrameloomError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if name not in os.environ:
                    raise FrameloomError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FrameloomError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        die_with_parent()  # the launcher (torchrun) is our parent: never outlive it
        chosen = backend or default_backend(device.type)
        kwargs: dict[str, Any] = {"backend": chosen, "rank": rank, "world_size": world}
        if timeout_s:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if "nccl" in chosen:
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Leave the process group (end of a command), if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 first, then on the others (e.g. loading what rank 0 builds on first use)."""
    if is_distributed() and dist.get_rank() != 0:
        dist.barrier()
        return fn()
    out = fn()
    barrier()
    return out


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python float over all processes (the value itself on one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process when `flag` is True on at least one (e.g. SIGTERM seen by some ranks)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (`[obj]` on one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
