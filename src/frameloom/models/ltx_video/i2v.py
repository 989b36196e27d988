"""LTX-Video first-frame conditioning: training so a LoRA also serves image-to-video, and the I2V sampling loop.

What ``LTXImageToVideoPipeline`` does at inference (diffusers 0.42, ``prepare_latents`` and the denoising
loop), which training must match:

1. the image is VAE-encoded first (a latent *sample* drawn with the seed's generator), normalized, and put at
   latent frame 0; the noise is drawn after it, for the whole latent; ``x = image at frame 0, noise after``;
2. every token gets the timestep ``t * (1 - conditioning_mask)``: the tokens of latent frame 0 are at time 0
   (clean), the others at ``t``;
3. the step is applied to frames 1.. only (frame 0 never changes); Euler on the pipeline's grid.

Training (``FirstFrameConditionedFlow``): with probability ``first_frame_conditioning_p`` per sample
(``model.config.first_frame_conditioning_p``, default 0.1), the first latent frame of ``x_t`` is the clean
latent, its time is 0 (``t`` becomes ``(B, T)`` per latent frame, the adapter turns it into per-token
timesteps), and the loss leaves that frame out (per sample, the mean over the frames that were noised). The
other samples train text-to-video as before. The draws: times and noise as ``FlowMatching.draw``, then one
uniform per sample for the choice, all from the step's generator.

finetrainers (``models/ltx_video/base_specification.py``) instead noises the first frame a little
(``sigma' <= min(U sigma, 0.25)``) with one timestep for all tokens and keeps it in the loss; frameloom
follows the pipeline it will be sampled with (clean frame, time 0, no loss there), as LTX-Video's own trainer
does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from frameloom.objectives.base import StepContext, TrainingInputs
from frameloom.objectives.flow import FlowMatching, flow_loss_weight
from frameloom.sampling.flow_euler import _batch_cfg

__all__ = ["FirstFrameConditionedFlow", "first_frame_euler", "masked_flow_loss"]


def masked_flow_loss(
    pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Flow MSE over the latent frames where ``frame_mask`` ``(B, T)`` is 1: per sample the mean over its
    kept elements, weighted per sample by ``weight`` ``(B,)``, then the batch mean (float32)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # (B, T): per frame
    m = frame_mask.to(err)
    per_sample = (err * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


class FirstFrameConditionedFlow:
    """``flow`` (LTX-Video's resolution-shifted flow matching) with first-frame conditioning (module
    docstring); ``frame_rate`` (the clips' frame rate) goes to the denoiser with every example."""

    def __init__(self, flow: FlowMatching, p: float, frame_rate: float | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"first_frame_conditioning_p must be in [0, 1], got {p}")
        self.flow = flow
        self.p = float(p)
        self.frame_rate = frame_rate

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        # 1. Times (B,) and noise as plain flow matching, x_t = (1 - t) x0 + t noise.
        inputs = self.flow.draw(x0, generator, ctx)
        if self.frame_rate is not None:
            inputs.model_kwargs["frame_rate"] = self.frame_rate
        if self.p == 0.0:
            return inputs
        # 2. Which samples condition on their first frame (one uniform each, after the noise).
        b, frames = x0.shape[0], x0.shape[2]
        first = (torch.rand(b, generator=generator, device=generator.device) < self.p).to(x0.device)
        # 3. Their first latent frame is clean at time 0; the loss leaves it out. (torch.where, not boolean
        #    indexing: no data-dependent shapes, so the memory planner can trace it on the meta device.)
        sigma = inputs.t  # (B,)
        frame_t = sigma[:, None].expand(b, frames).clone()  # (B, T)
        frame_t[:, 0] = torch.where(first, torch.zeros_like(sigma), sigma)
        x_t = inputs.x_t.clone()
        x_t[:, :, 0] = torch.where(first.view(b, 1, 1, 1), x0[:, :, 0].to(x_t.dtype), x_t[:, :, 0])
        keep = torch.ones(b, frames, device=x0.device)
        keep[:, 0] = (~first).to(keep.dtype)
        inputs.x_t, inputs.t = x_t, frame_t
        inputs.extras.update(sigma=sigma, frame_mask=keep, first_frame=first)
        return inputs

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        if "frame_mask" not in inputs.extras:
            return self.flow.loss(pred, inputs)
        weight = flow_loss_weight(inputs.extras["sigma"], self.flow.loss_weighting)
        return masked_flow_loss(pred, inputs.target, inputs.extras["frame_mask"], weight)


@torch.no_grad()
def first_frame_euler(
    model_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    guidance: float,
) -> torch.Tensor:
    """Euler from ``x`` ``(B, C, T, h, w)`` (clean latent frame 0, noise after) over ``sigmas``, frame 0
    held at time 0 and never stepped (module docstring, steps 2-3); classifier-free guidance as one batched
    ``[uncond; cond]`` call ``model_fn(x, t (2B, T), text, mask)``."""
    b, frames = x.shape[0], x.shape[2]
    use_cfg = guidance != 1.0
    text, mask = _batch_cfg(cond, uncond, b) if use_cfg else cond
    times = sigmas.tolist()
    for i in range(len(times) - 1):
        t = torch.full((b, frames), times[i], device=x.device)
        t[:, 0] = 0.0  # the conditioning frame's tokens
        if use_cfg:
            v_u, v_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), text, mask).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model_fn(x, t, text, mask)
        x = torch.cat([x[:, :, :1], x[:, :, 1:] + (times[i + 1] - times[i]) * v[:, :, 1:].to(x.dtype)], dim=2)
    return x
