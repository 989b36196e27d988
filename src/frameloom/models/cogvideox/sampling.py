"""CogVideoX sampling: frameloom's own DDIM loop (``frameloom sample``) and validation through diffusers'
CogVideoX pipeline built around the in-training weights.

frameloom's loop reproduces ``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline`` with
``CogVideoXDDIMScheduler`` step for step, so the two give the same video for the same seed, steps, guidance
and negative prompt (tests/test_family_cogvideox.py checks 1.0 T2V, 1.0 I2V and 1.5 I2V):

1. one CPU generator ``Generator().manual_seed(seed)`` per video, used in the pipeline's order: I2V first
   encodes the image (a VAE *sample* drawn with it, scaled like the pipeline), then the noise
   ``randn((1, T', C, h, w))`` in the pipeline's ``(B, T, C, H, W)`` layout, where ``T'`` adds CogVideoX
   1.5's extra latent frames; the text is encoded with ``model.id_token`` (positive prompts only: the
   negative prompt is encoded as the string it is, never with the trigger word);
2. timesteps ``ddim_timesteps(N, steps, spacing)``; at each, one batched forward of ``[uncond; cond]``,
   ``v = v_u + g (v_c - v_u)``, ``x0 = sqrt(ab) x - sqrt(1 - ab) v``, then the DDIM step to
   ``t - N // steps`` (``alpha_bar = 1`` past the end when ``set_alpha_to_one``);
3. drop the extra front frames and decode with the VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from frameloom.config.schema import Config
from frameloom.models.cogvideox.objective import image_condition
from frameloom.models.diffusers_family import unwrap_text_encoder
from frameloom.objectives.ddpm import DDPMSchedule, ddim_step, ddim_timesteps, x0_from_v
from frameloom.sampling.family_sampling import validate_with_pipeline, validation_images

__all__ = ["ddim_sample", "describe_sampler", "sample_videos", "validate"]


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    schedule: DDPMSchedule,
    steps: int,
    guidance: float,
    image_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) from ``noise`` ``(B, C, T, h, w)`` with v-prediction and classifier-free guidance;
    ``image_cond`` ``(B, C, T, h, w)`` is concatenated on channels for I2V models."""
    n = schedule.num_train_timesteps
    ab = schedule.alphas_cumprod
    use_cfg = guidance > 1.0  # the pipeline's rule
    text = torch.cat([uncond[0], cond[0]]) if use_cfg else cond[0]
    mask = torch.cat([uncond[1], cond[1]]) if use_cfg else cond[1]
    x = noise
    for t in ddim_timesteps(n, steps, schedule.timestep_spacing, schedule.steps_offset):
        x_in = torch.cat([x, x]) if use_cfg else x
        if image_cond is not None:
            x_in = torch.cat([x_in, torch.cat([image_cond, image_cond]) if use_cfg else image_cond], dim=1)
        tt = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x.device)
        v = model(x_in, tt, text, mask).float()
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        prev = t - n // steps
        ab_t = float(ab[t])
        ab_prev = float(ab[prev]) if prev >= 0 else schedule.final_alpha_cumprod
        x = ddim_step(x, x0_from_v(x, v, ab_t), ab_t, ab_prev).to(noise.dtype)
    return x


@torch.no_grad()
def sample_videos(
    model: torch.nn.Module,
    text_encoder,
    codec,
    cfg: Config,
    prompts: Sequence[str],
    seeds: Sequence[int],
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] for ``prompts[i]`` with ``seeds[i]`` (the family ``sample`` hook).

    I2V models take ``images`` ``(N, 3, H, W)`` in [-1, 1], or ``model.config.validation_images``.
    """
    config = model.transformer.config
    device = next(model.parameters()).device
    schedule = DDPMSchedule.from_pretrained(model.pretrained)
    t_lat, h, w = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    p_t = config.patch_size_t
    extra = (-t_lat) % p_t if p_t else 0
    channels = config.out_channels or config.in_channels
    if getattr(model, "is_i2v", False) and images is None:
        images = validation_images(cfg, len(prompts))
    neg = unwrap_text_encoder(text_encoder).encode([cfg.sample.negative_prompt])  # no id_token
    out = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        # 1. The pipeline's draws from one CPU generator: the image latent (I2V) first, then the noise.
        g = torch.Generator().manual_seed(int(seed))
        image_cond = None
        if images is not None:
            latent = codec.encode(
                images[i : i + 1].unsqueeze(2).to(device), generator=g
            ).float()  # (1, C, 1, h, w)
            latent = latent * _image_scale(codec)
            image_cond = image_condition(latent, t_lat + extra)  # (1, C, T', h, w)
        noise = torch.randn((1, t_lat + extra, channels, h, w), generator=g).permute(0, 2, 1, 3, 4).to(device)
        emb, mask = text_encoder.encode([prompt])
        # 2. DDIM with guidance.
        x = ddim_sample(
            model,
            noise,
            (emb.to(device), mask.to(device)),
            (neg[0].to(device), neg[1].to(device)),
            schedule,
            cfg.sample.steps,
            cfg.sample.guidance,
            image_cond,
        )
        # 3. Drop CogVideoX 1.5's extra front frames, decode.
        out.append(codec.decode(x[:, :, extra:]).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def describe_sampler(model: torch.nn.Module, cfg: Config) -> str:
    """What ``sample_videos`` integrates with, for the log and the mp4 metadata."""
    schedule = DDPMSchedule.from_pretrained(model.pretrained)
    return (
        f"DDIM (eta 0, {schedule.timestep_spacing} timesteps, CogVideoXDDIMScheduler's step), "
        f"{cfg.sample.steps} steps, guidance {cfg.sample.guidance:g}"
    )


def _image_scale(codec) -> float:
    """The I2V conditioning latent relative to the normalized latent (``z * s``): 1, or ``1 / s^2`` when the
    VAE config sets ``invert_scale_latents`` (the pipeline then uses ``z / s``)."""
    s = codec.vae.config.scaling_factor
    return 1.0 / (s * s) if codec.vae.config.get("invert_scale_latents", False) else 1.0


@torch.no_grad()
def validate(model: torch.nn.Module, text_encoder, codec, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Generate ``validation.prompts`` with diffusers' CogVideoX pipeline around the in-training transformer
    (LoRA layers active), one mp4 per prompt in ``out_dir``; I2V takes ``model.config.validation_images``."""
    if not getattr(model, "is_i2v", False):
        return validate_with_pipeline(model, text_encoder, codec, cfg, out_dir)
    images = validation_images(cfg, len(cfg.validation.prompts))
    return validate_with_pipeline(  # the pipeline takes [0, 1] images
        model, text_encoder, codec, cfg, out_dir, extra=lambda i: {"image": (images[i : i + 1] + 1) / 2}
    )
