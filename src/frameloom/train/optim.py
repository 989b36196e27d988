"""AdamW, the warm-up + constant/cosine learning-rate schedule, and a step that skips on non-finite gradients.

The optimizer is torch's fused AdamW (one kernel over all parameters, on CUDA and on CPU). A step whose
gradients are not finite is skipped the way GradScaler skips one: the optimizer receives a `found_inf` tensor,
the fused kernel leaves parameters, both moments and the step count untouched where it is 1 (torch adds one to
the step counts and subtracts `found_inf` again), and the host never reads the flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from frameloom.config.schema import OptimConfig

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over `warmup` steps, then `constant` (1) or `cosine` decay to
    `min_ratio` at `total` (the usual half-cosine, as in SGDR / most diffusion trainers).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r} (constant, cosine)")


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW runs on CUDA and CPU tensors of float32/16/bf16 (DTensors too)."""
    return all(p.device.type in ("cuda", "cpu") and p.dtype in _FUSED_DTYPES for p in params)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (fused where torch has the kernel) and its LambdaLR schedule."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and _fused_ok(params)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio
        ),
    )
    return optimizer, scheduler


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()` unless `found_inf` (a 0-dim float tensor, 1.0 = skip) is set.

    Fused AdamW takes the flag on the device (no host sync); another optimizer reads it on the host.
    """
    fused = all(group.get("fused") for group in optimizer.param_groups)
    if fused:
        optimizer.found_inf = found_inf  # read by torch's fused Adam(W) step, as GradScaler sets it
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):  # host sync: only optimizers without the fused kernel get here
        optimizer.step()
