"""AdamW and the warm-up + constant/cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from frameloom.config.schema import OptimConfig


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


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its LambdaLR schedule."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio
        ),
    )
    return optimizer, scheduler
