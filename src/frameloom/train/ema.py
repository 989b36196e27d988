"""Exponential moving average of the trainable weights, kept in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used at optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    The warm-up term (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps early averages from
    being dominated by the random initial weights; short runs such as the quickstart need it.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor, sharing its storage."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Shadow copies of the trainable parameters, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, skipped: torch.Tensor | None = None) -> None:
        """shadow <- lerp(shadow, param, 1 - decay). `skipped` (a 0-dim float tensor, 1 = the optimizer step
        was skipped) turns the weight to 0 on the device, so a skipped step leaves the average unchanged
        without the host reading the flag."""
        d = ema_decay_at(step, self.decay)
        shadows, params = [], []
        for name, p in model.named_parameters():
            if name in self.shadow:
                shadows.append(self.shadow[name])
                params.append(p.detach().float())  # a no-op view for fp32 weights
        if not shadows:
            return
        if skipped is None:
            weight: float | torch.Tensor = 1.0 - d
        else:  # (1 - d) * (1 - skipped), on the shadows' device
            weight = (1.0 - skipped.to(shadows[0].device, torch.float32)) * (1.0 - d)
        # One fused update over all tensors (the per-tensor loop costs ~3% of a small model's step on CPU).
        torch._foreach_lerp_(shadows, params, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the EMA weights into `model` (for sampling)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`model` carrying the EMA weights for the duration of the block, its own weights back afterwards.

        In place, on each rank's own shard under FSDP: the trained weights wait in host memory meanwhile, so
        no device ever holds a second copy of the model (validation of a 14B model needs no extra 28 GB).
        """
        backup: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.shadow:
                    backup[name] = _local(p.detach()).to("cpu", copy=True)
                    _local(p.detach()).copy_(_local(self.shadow[name]))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        _local(p.detach()).copy_(backup[name])
