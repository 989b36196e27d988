"""Exponential moving average of the trainable weights, kept in fp32."""

from __future__ import annotations

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used at optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    The warm-up term (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps early averages from
    being dominated by the random initial weights; short runs such as the quickstart need it.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Shadow copies of the trainable parameters, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = ema_decay_at(step, self.decay)
        shadows, params = [], []
        for name, p in model.named_parameters():
            if name in self.shadow:
                shadows.append(self.shadow[name])
                params.append(p.detach().float())  # a no-op view for fp32 weights
        # One fused update over all tensors (the per-tensor loop costs ~3% of a small model's step on CPU).
        torch._foreach_lerp_(shadows, params, 1.0 - d)

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
