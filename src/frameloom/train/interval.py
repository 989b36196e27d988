"""What the training loop knows about its steps, read by the host once per logging interval.

Each optimizer step leaves its loss, gradient norm and skip flag on the device (one stacked `(3,)` tensor, no
host read). `flush` brings the interval's `(k, 3)` values to the host with one all-reduce and one copy, turns
them into one metrics record per step, and keeps the counters that need every step: the total of skipped
steps and the current run of consecutive skips (the non-finite guard).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from frameloom.errors import FrameloomError


class NonFiniteStop(FrameloomError):
    """Too many consecutive steps had non-finite gradients: the run stops (its last checkpoint is kept)."""


@dataclass
class _Pending:
    step: int
    values: torch.Tensor  # (3,) on the device: loss, grad norm, skipped (1.0) or applied (0.0)
    host: dict[str, Any]  # what the host already knows (lr, substituted samples)


@dataclass
class IntervalLog:
    """Device-side step values of the current interval and the counters the host keeps from them.

    `skipped_steps` and `consecutive_skips` count every step up to the last flush (they are checkpoint
    state: restore both on resume)."""

    world_size: int = 1
    skipped_steps: int = 0
    consecutive_skips: int = 0
    pending: list[_Pending] = field(default_factory=list)

    def add(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor, **host: Any
    ) -> None:
        """Record step `step` (0-dim device tensors: this rank's loss, the global grad norm, the skip flag)."""
        # (3,) on the loss's device, no host read (the norm is on the host under FSDP CPU offload)
        values = torch.stack(
            [loss.float(), grad_norm.to(loss.device).float(), skipped.to(loss.device).float()]
        )
        self.pending.append(_Pending(step, values, host))

    def flush(self, reduce: Any = None) -> list[dict[str, Any]]:
        """The pending steps as metrics records (one host read). `reduce(tensor)` sums a tensor over ranks in
        place (None: one process); the loss is the mean over ranks, a step counts as skipped if any rank
        skipped it (they always agree: the flag comes from the all-reduced gradients)."""
        if not self.pending:
            return []
        local = torch.stack([p.values for p in self.pending])  # (k, 3)
        summed = local.clone()
        if reduce is not None and self.world_size > 1:
            summed = reduce(summed)
        loss = summed[:, 0] / self.world_size
        table = torch.stack([loss, local[:, 1], (summed[:, 2] > 0).float()], dim=1).cpu().tolist()  # one sync
        records = []
        for p, (loss_v, norm_v, skipped_v) in zip(self.pending, table):
            if skipped_v:
                self.skipped_steps += 1
                self.consecutive_skips += 1
            else:
                self.consecutive_skips = 0
            records.append(
                {
                    "step": p.step,
                    "loss": loss_v,
                    "grad_norm": norm_v,
                    **p.host,
                    "skipped": bool(skipped_v),
                    "skipped_steps": self.skipped_steps,
                    "consecutive_skips": self.consecutive_skips,
                }
            )
        self.pending = []
        return records
