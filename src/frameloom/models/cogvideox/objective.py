"""CogVideoX's training objective: v-prediction DDPM with the scheduler config of the model directory and
the ``1 / (1 - alpha_bar)``-weighted x0 loss (frameloom.objectives.ddpm), plus CogVideoX's two input rules.

1. CogVideoX 1.5 (``patch_size_t`` = 2): the latent frames are padded to a multiple of the temporal patch by
   repeating the first latent frame in front (upstream ``ncopy = T % patch_size_t`` copies; frameloom
   prepends ``(-T) mod patch_size_t``, the same for patch 2). The loss covers the padded latent, as upstream.
2. Image-to-video (transformer ``in_channels == 2 * out_channels``): the conditioning is the image latent at
   frame 0, zero in every later frame, concatenated on channels after the noisy latent; ``x_t`` handed to
   the denoiser is that ``(B, 2C, T, H, W)`` tensor and ``extras["x_noisy"]`` keeps the plain noisy latent.

   What frameloom does vs upstream (CogVideo's ``finetune/models/cogvideox_i2v``):
   - image latent: upstream VAE-encodes the first *pixel* frame (plus pixel noise) separately at every step;
     frameloom takes the clip's first *latent* frame from the (cached) video latent, so training needs no
     VAE. CogVideoX's VAE is causal in time, so that frame is encoded from pixel frame 0 alone, except for
     the encoder's temporal group norms, which see the whole clip (a small difference).
   - image noise: ``sigma = exp(N(-3, 0.5))`` as upstream, but drawn per sample (upstream: one per batch)
     and added to the latent (upstream: to the pixels before encoding).
   - image dropout: the conditioning is zeroed with ``noised_image_dropout`` (``model.config``, default 0.05,
     upstream's default).
   - scale: the conditioning latent is scaled as the diffusers I2V pipeline scales it at inference
     (``* scaling_factor``, or ``/ scaling_factor`` when the VAE config has ``invert_scale_latents``, as
     CogVideoX 1.5 I2V's has), so training matches how the fine-tuned model will be sampled. Upstream's
     trainer always uses ``* scaling_factor``.
   - CogVideoX 1.5 I2V: the padded latent ``[f0, f0, f1, ...]`` gets the conditioning ``[img, 0, 0, ...]``
     over all its frames, as both upstream's trainer and the pipeline (whose first, extra frame is dropped
     after sampling) lay it out.
"""

from __future__ import annotations

import torch

from frameloom.objectives.base import StepContext, TrainingInputs
from frameloom.objectives.ddpm import DDPMSchedule, VPredictionDDPM

__all__ = ["CogVideoXObjective", "image_condition", "pad_first_frame"]


def pad_first_frame(latent: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Prepend copies of frame 0 until ``T`` is a multiple of ``patch_size_t`` (``(B, C, T, H, W)``)."""
    if not patch_size_t:
        return latent
    extra = (-latent.shape[2]) % patch_size_t
    if extra == 0:
        return latent
    return torch.cat([latent[:, :, :1].expand(-1, -1, extra, -1, -1), latent], dim=2)


def image_condition(image_latent: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B, C, 1, H, W)`` image latent -> ``(B, C, frames, H, W)`` conditioning: the image at frame 0 and
    zeros after it (diffusers' I2V ``prepare_latents``; ``frames`` already includes CogVideoX 1.5's padding)."""
    zeros = image_latent.new_zeros(*image_latent.shape[:2], frames - 1, *image_latent.shape[3:])
    return torch.cat([image_latent, zeros], dim=2)


class CogVideoXObjective(VPredictionDDPM):
    """v-prediction DDPM + CogVideoX's frame padding and I2V conditioning (module docstring)."""

    def __init__(
        self,
        schedule: DDPMSchedule,
        *,
        patch_size_t: int | None = None,
        i2v: bool = False,
        image_scale: float = 1.0,
        noised_image_dropout: float = 0.05,
        image_noise_mean: float = -3.0,
        image_noise_std: float = 0.5,
        t_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(schedule, t_range)
        self.patch_size_t = patch_size_t
        self.i2v = i2v
        self.image_scale = image_scale
        self.noised_image_dropout = noised_image_dropout
        self.image_noise_mean = image_noise_mean
        self.image_noise_std = image_noise_std

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        # 1. CogVideoX 1.5: repeat frame 0 in front up to a multiple of the temporal patch.
        x0 = pad_first_frame(x0, self.patch_size_t)  # (B, C, T', H, W)
        # 2. Timesteps, noise, x_t and the v target (drawn in that order from `generator`).
        inputs = super().draw(x0, generator, ctx)
        if not self.i2v:
            return inputs
        # 3. I2V: noisy image latent at frame 0, zeros after, concatenated on channels.
        b = x0.shape[0]
        dev = generator.device
        sigma = torch.exp(
            torch.randn(b, generator=generator, device=dev) * self.image_noise_std + self.image_noise_mean
        )
        image_noise = torch.randn((b, x0.shape[1], 1, *x0.shape[3:]), generator=generator, device=dev)
        keep = torch.rand(b, generator=generator, device=dev) >= self.noised_image_dropout
        image = (
            x0[:, :, :1] * self.image_scale
        )  # the clip's own first latent frame (also frame 0 when padded)
        image = image + sigma.to(x0).view(b, 1, 1, 1, 1) * image_noise.to(x0)
        image = image * keep.to(x0).view(b, 1, 1, 1, 1)
        cond = image_condition(image, x0.shape[2])  # (B, C, T', H, W)
        inputs.x_t = torch.cat([inputs.extras["x_noisy"], cond], dim=1)  # (B, 2C, T', H, W)
        inputs.extras["image_condition"] = cond
        return inputs
