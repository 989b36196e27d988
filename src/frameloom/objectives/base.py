"""The interface every training objective implements, so the trainer never knows which one it runs.

An objective turns clean latents into one training example (`draw`) and scores the model's prediction on it
(`loss`). All randomness comes from the generator the trainer passes in (drawn on the generator's device, then
moved), which keeps resumed runs bit-identical. Families whose objective differs (CogVideoX: v-prediction DDPM
with an x0-space weighted loss) implement the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class TrainingInputs:
    """One drawn training example. Shapes: latents (B, C, T, H, W); `t` (B,) as the denoiser receives it."""

    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class Objective(Protocol):
    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> TrainingInputs:
        """Sample times and noise for clean latents `x0` and build the noisy input and the target."""

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        """The scalar training loss of the denoiser's prediction `pred` (shaped like `inputs.x_t`)."""
