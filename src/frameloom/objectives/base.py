"""The interface every training objective implements, so the trainer never knows which one it runs.

An objective turns clean latents into one training example (`draw`) and scores the model's prediction on it
(`loss`). All randomness comes from the generator the trainer passes in (drawn on the generator's device, then
moved), which keeps resumed runs bit-identical. Families whose objective differs (CogVideoX: v-prediction DDPM
with an x0-space weighted loss) implement the same two methods.

Two optional extensions serve objectives whose training example is more than one noisy tensor:
- `TrainingInputs.model_kwargs` are passed to the denoiser as keyword arguments (e.g. an image-conditioning
  input built from the clean latents);
- `predict(model, inputs, cond)`, when an objective defines it, replaces the trainer's single call
  `model(x_t, t, emb, mask, **extras, **model_kwargs)`, for examples that need several calls or a call of
  another shape (Pyramid Flow: one sequence per pyramid stage); `loss` then receives what it returned.
A denoiser that takes the clips' frame rates (LTX-Video's RoPE time scale) gets them through the first
extension: an objective that sets `model_kwargs["frame_rate"]` (the run's fallback rate) has it replaced by the
batch's per-clip rates `(B,)` (`with_clip_frame_rates`; the trainer does this when the batch has `fps`).
`StepContext` tells `draw` where the micro-batch sits in the run (step, data-parallel position, position in a
`video_sync_group`), for objectives whose choices depend on it (stratified timesteps across ranks, the AR
unit a rank of a video_sync_group trains).
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
    x_t: Any
    t: Any
    target: Any
    extras: dict[str, Any] = field(default_factory=dict)
    """What `loss` needs besides the above (weights, masks); never passed to the model."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the denoiser's forward for this example."""


@dataclass(frozen=True)
class StepContext:
    """Where a micro-batch sits in the run (the trainer's view; 0/1 defaults describe one process)."""

    step: int = 0
    """Optimizer step being computed (0-based)."""
    micro: int = 0
    """Micro-step inside gradient accumulation."""
    data_rank: int = 0
    """Index of the batch this process reads among the `data_world` distinct batches of a micro-step."""
    data_world: int = 1
    """Distinct batches per micro-step (processes / (sp_size x video_sync_group))."""
    sync_rank: int = 0
    """Position inside the video_sync_group (ranks of one group share the batch)."""
    sync_size: int = 1
    """parallel.video_sync_group."""

    @property
    def slot(self) -> int:
        """The micro-batch's place in the step's global batch (also the key of its random stream)."""
        return self.micro * self.data_world + self.data_rank


@dataclass
class Conditioning:
    """The text side of a batch as the denoiser receives it: token embeddings (B, L, D), their mask (B, L),
    and the text encoder's extra per-caption tensors (e.g. `pooled` (B, P)), passed as keyword arguments."""

    emb: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        """Sample times and noise for clean latents `x0` and build the noisy input and the target."""

    def loss(self, pred: Any, inputs: TrainingInputs) -> torch.Tensor:
        """The scalar training loss of the denoiser's prediction `pred` (shaped like `inputs.x_t`)."""


def with_clip_frame_rates(inputs: TrainingInputs, fps: torch.Tensor | None) -> TrainingInputs:
    """Give the denoiser the batch's per-clip frame rates `fps` (B,) as `frame_rate` when the objective asked
    for a frame rate (`model_kwargs["frame_rate"]`, a number: the run's fallback, which fills the clips whose
    rate is unknown, NaN or <= 0: images, precomputed latents). Other objectives are left as they are."""
    fallback = inputs.model_kwargs.get("frame_rate")
    if fps is None or fallback is None or isinstance(fallback, torch.Tensor):
        return inputs
    known = torch.isfinite(fps) & (fps > 0)
    inputs.model_kwargs["frame_rate"] = torch.where(known, fps, torch.full_like(fps, float(fallback)))  # (B,)
    return inputs


def call_denoiser(model: torch.nn.Module, inputs: TrainingInputs, cond: Conditioning) -> Any:
    """The default prediction: one call `model(x_t, t, emb, mask, **extras, **model_kwargs)`."""
    return model(inputs.x_t, inputs.t, cond.emb, cond.mask, **cond.extras, **inputs.model_kwargs)


def predict(objective: Any, model: torch.nn.Module, inputs: TrainingInputs, cond: Conditioning) -> Any:
    """The objective's own `predict` when it has one, else `call_denoiser`."""
    own = getattr(objective, "predict", None)
    return own(model, inputs, cond) if own is not None else call_denoiser(model, inputs, cond)
