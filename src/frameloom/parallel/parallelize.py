"""The one `parallelize` step: a single-device model in, the trained form out, in a fixed order.

1. sequence parallelism (the attention kernel and the sequence split; changes what a block computes on),
2. activation checkpointing per block (inside each block, so it recomputes the sharded sequence),
3. torch.compile per block (compiles the checkpointed forward), or of the whole denoiser,
4. DDP or FSDP2 (outermost: its hooks gather/reduce around everything above).

The order is torchtitan's (TP/CP -> AC -> compile -> FSDP). Activation offload is a context the trainer
opens around the forward (`Parallelized.activation_context`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from frameloom.config.schema import ParallelConfig
from frameloom.errors import FrameloomError
from frameloom.parallel.data_parallel import apply_ddp, apply_fsdp
from frameloom.parallel.env import DistEnv
from frameloom.parallel.memory import (
    apply_activation_checkpointing,
    compile_blocks,
    compile_unavailable,
    offload_activations,
)
from frameloom.parallel.mesh import build_mesh, data_parallel_mesh, sp_group
from frameloom.parallel.plan import ParallelPlan, plan_parallel
from frameloom.parallel.sequence import apply_sequence_parallel, diffusers_context_parallel

log = logging.getLogger("frameloom.parallel")


@dataclass
class Parallelized:
    """The parallelized model and what the training loop needs to drive it.

    `module` is the model with its original parameter names (FSDP2 shards in place; DDP wraps), used for
    state dicts, EMA and the optimizer; `forward` is what to call (the DDP wrapper or the module itself).
    """

    module: nn.Module
    forward: nn.Module
    plan: ParallelPlan
    config: ParallelConfig
    env: DistEnv
    mesh: Any = None
    checkpointed_blocks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """`single`, `ddp` or `fsdp`."""
        if self.plan.world_size == 1:
            return "single"
        return self.config.data_parallel

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    @property
    def loss_scale(self) -> float:
        """Backward multiplier that turns the data-parallel mean over sp ranks into the needed sum."""
        return float(self.plan.sp)

    def gradient_sync(self, enabled: bool):
        """Context for one micro-step: DDP skips its all-reduce until the last micro-step of accumulation.

        FSDP2 reduce-scatters every micro-step (gradients stay sharded: the point of ZeRO)."""
        if self.kind == "ddp" and not enabled:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def activation_context(self):
        return offload_activations(self.config.offload_activations, pin_memory=self.env.device.type == "cuda")


def parallelize(
    model: nn.Module,
    p: ParallelConfig,
    env: DistEnv,
    *,
    batch_size: int = 1,
    compile_backend: str = "inductor",
) -> Parallelized:
    """Apply the configured parallelism and memory savers to `model`: on `env.device` already, except for
    FSDP, where it may still be on the CPU (FSDP2 moves and shards it one unit at a time, `apply_fsdp`, so a
    model larger than one device trains with `cpu_offload`)."""
    plan = plan_parallel(p, env.world_size, batch_size)
    mesh = build_mesh(plan, env.device.type) if env.distributed else None
    # 1. sequence parallel
    group = sp_group(mesh)
    if group is not None:
        kind = sequence_parallel_kind(model)
        if kind == "diffusers":
            diffusers_context_parallel(model.transformer, plan, env.device.type)
        elif kind == "model":
            model.enable_sequence_parallel(group)
        else:
            apply_sequence_parallel(model, group)
    # 2. activation checkpointing
    n_ckpt = apply_activation_checkpointing(model, p)
    # 3. compile (a preset may ask for it: without a toolchain, say so and train eagerly rather than fail
    # at the first step)
    if p.compile:
        reason = compile_unavailable(env.device.type, compile_backend)
        if reason is None and p.compile == "model":
            model.compile(backend=compile_backend)  # one graph; parameter names unchanged
        elif reason is None:
            compile_blocks(model, backend=compile_backend)
        else:
            log.warning("parallel.compile: %s; training without torch.compile", reason)
    # 4. data parallel
    forward: nn.Module = model
    if env.distributed:
        if p.data_parallel == "fsdp":
            apply_fsdp(model, data_parallel_mesh(plan, env.device.type), p, env.device)
        else:
            forward = apply_ddp(model, env.device)
    return Parallelized(
        module=model, forward=forward, plan=plan, config=p, env=env, mesh=mesh, checkpointed_blocks=n_ckpt
    )


#: diffusers transformers that declare a `_cp_plan` but whose context parallelism fails in frameloom's call
#: (diffusers 0.42.1, 2 gloo processes): class name -> why.
CP_BROKEN = {
    "LTXVideoTransformer3DModel": "diffusers' Ulysses attention fails on its text attention mask "
    "(SDPA: output with shape [1, 1, 32, 10] doesn't match the broadcast shape [1, 2, 32, 10])",
}


def sequence_parallel_kind(model: nn.Module) -> str:
    """How `parallel.sp_size > 1` is applied to `model`: `model` (the model's own
    `enable_sequence_parallel(group)`, built on `frameloom.parallel.sequence`'s Ulysses pieces: the seed
    families' transformers), `native` (frameloom's Ulysses, for the native DiT) or `diffusers` (diffusers' context parallelism on a family adapter's transformer, whose class must declare
    a `_cp_plan` and not be in `CP_BROKEN`: Wan in diffusers 0.42.1; not CogVideoX, which has no plan, nor
    LTX-Video)."""
    from frameloom.models.diffusers_family import DiffusersDenoiser

    if hasattr(model, "enable_sequence_parallel"):  # the model splits its own sequence (seed families)
        return "model"
    if not isinstance(model, DiffusersDenoiser):
        return "native"
    name = type(model.transformer).__name__
    if getattr(model.transformer, "_cp_plan", None) is None:
        why = f"diffusers' {name} has no context-parallel plan"
    elif name in CP_BROKEN:
        why = f"{name}: {CP_BROKEN[name]}"
    else:
        return "diffusers"
    raise FrameloomError(
        f"parallel.sp_size > 1: sequence parallelism is not available for {type(model).__name__} ({why}); "
        "use sp_size: 1"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
