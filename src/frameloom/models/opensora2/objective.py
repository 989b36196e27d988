"""Open-Sora 2.0's training objective: its flow matching plus the image-conditioning mix.

Flow matching (``scripts/diffusion/train.py``, SEED_FACTS.md; ``objectives/flow.py`` has the maths):
``t = sigmoid(N(0, 1))`` shifted by ``(1 + (S - 256) * 2 / 3840) * sqrt(T_lat)`` (``shift: auto``),
``x_t = (1 - t) x0 + (1 - (1 - s_min)(1 - t)) eps``, target ``(1 - s_min) eps - x0``, ``s_min = 1e-5``, MSE.

Image conditioning (``opensora/utils/train.py``, ``prepare_visual_condition_causal``): every sample of a
video batch draws one condition kind with the weights of ``condition_config`` (the i2v presets: t2v 1 :
i2v_head 5 : i2v_loop 1 : i2v_tail 1) and the model receives ``cond = [mask; mask * reference]``
``(B, 1 + C, T, H, W)`` through ``cond_in``: ``i2v_head`` marks latent frame 0, ``i2v_tail`` the last,
``i2v_loop`` both, ``t2v`` none; the reference latent of a marked frame is the clip's own. The noisy input
and the loss cover every frame, conditioned ones included (upstream's default). Images (T = 1) are never
conditioned.

Where frameloom differs, on purpose (docs/opensora2.md): the kinds are drawn from the step's generator
(not Python's global ``random``), so a resumed run draws the same ones; and the reference frames come from
the clip's latent ``x0`` (cached latents carry no pixels). With the causal HunyuanVideo VAE latent frame 0
depends on frame 0 only, so ``i2v_head`` is exactly upstream's (which encodes the first frame alone); the
tail frame upstream is the last video frame encoded alone as an image, here the clip's last latent frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from frameloom.errors import FrameloomError
from frameloom.objectives.base import StepContext, TrainingInputs
from frameloom.objectives.flow import FlowMatching, flow_loss

__all__ = ["CONDITION_KINDS", "OpenSoraFlow", "condition_tensor", "draw_conditions"]

#: The condition kinds frameloom implements (Open-Sora's v2v_* kinds are not).
CONDITION_KINDS = ("t2v", "i2v_head", "i2v_loop", "i2v_tail")


def draw_conditions(n: int, weights: Mapping[str, float], generator: torch.Generator) -> list[str]:
    """``n`` condition kinds drawn with probabilities proportional to ``weights`` (``random.choices`` in the
    seed), from ``generator``."""
    kinds = list(weights)
    # on the generator's device (the trainer's generator is on the training device)
    w = torch.tensor([float(weights[k]) for k in kinds], dtype=torch.float64, device=generator.device)
    idx = torch.multinomial(w, n, replacement=True, generator=generator)  # (n,)
    return [kinds[i] for i in idx.tolist()]


def condition_tensor(x0: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """``cond = [mask; mask * x0]`` ``(B, 1 + C, T, H, W)`` for one kind per sample (see module docstring)."""
    B, C, T, H, W = x0.shape
    mask = x0.new_zeros(B, 1, T, 1, 1)
    if T > 1:
        for i, kind in enumerate(kinds):
            if kind in ("i2v_head", "i2v_loop"):
                mask[i, :, 0] = 1
            if kind in ("i2v_tail", "i2v_loop"):
                mask[i, :, -1] = 1
    mask = mask.expand(B, 1, T, H, W)
    return torch.cat([mask, mask * x0], dim=1)


@dataclass
class OpenSoraFlow:
    """``FlowMatching.opensora()`` (or a configured variant) with the image-conditioning mix.

    ``condition_config``: kind -> weight (empty: no ``cond`` passed; a ``cond_embed`` model then sees zeros,
    i.e. text-to-video).
    """

    flow: FlowMatching = field(default_factory=FlowMatching.opensora)
    condition_config: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.condition_config) - set(CONDITION_KINDS))
        if unknown:
            raise FrameloomError(
                f"model.config.condition_config: unknown kind(s) {unknown}; frameloom implements "
                f"{', '.join(CONDITION_KINDS)}"
            )
        if self.condition_config and (
            any(float(w) < 0 for w in self.condition_config.values())
            or sum(self.condition_config.values()) <= 0
        ):
            raise FrameloomError("model.config.condition_config: weights must be >= 0 with a positive sum")

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        """Times, then noise (``FlowMatching.draw``), then the condition kinds, all from ``generator``."""
        inputs = self.flow.draw(x0, generator, ctx)
        if self.condition_config:
            kinds = draw_conditions(x0.shape[0], self.condition_config, generator)
            inputs.model_kwargs["cond"] = condition_tensor(x0, kinds)  # (B, 1 + C, T, H, W)
            inputs.extras["conditions"] = kinds
        return inputs

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        """MSE to ``(1 - s_min) eps - x0`` over every element (``F.mse_loss`` upstream; equal here, as a batch
        holds one shape)."""
        return flow_loss(pred, inputs.target)
