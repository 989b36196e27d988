"""Videos from a DDPM-trained denoiser (``objective.name: ddpm``): frameloom's native DiT and Open-Sora-Plan's,
with the samplers of ``ddpm_samplers`` (``sample.scheduler``, default EulerAncestral).

Per (prompt, seed), as Open-Sora-Plan's ``OpenSoraPipeline`` does for a batch of one: the noise
``randn((1, C, t, h, w), generator=Generator().manual_seed(seed))`` times the scheduler's ``init_noise_sigma``;
at each step one forward of ``[negative prompt; prompt]`` (``u + g (c - u)``, skipped at ``g <= 1``), the
scheduler step (EulerAncestral's noise from the same generator); then the codec decodes. The denoiser is
called as ``model(x, t, text, mask)`` with float timesteps. A video depends only on its prompt, seed and
settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from frameloom.config.schema import Config
from frameloom.sampling.ddpm_samplers import DDPMSampler, SchedulerConfig, sample_ddpm

__all__ = ["ddpm_videos", "scheduler_config", "scheduler_kind"]


def scheduler_config(cfg: Config) -> SchedulerConfig:
    """The training schedule of ``objective.name: ddpm`` (diffusers' ``DDPMScheduler`` betas) with its
    prediction type; trailing timesteps with zero terminal SNR, else leading (Open-Sora-Plan's rule)."""
    o = cfg.objective
    return SchedulerConfig.open_sora_plan(o.prediction_type, bool(o.rescale_betas_zero_snr))


def scheduler_kind(cfg: Config) -> str:
    """``sample.scheduler``, ``auto`` meaning EulerAncestral (Open-Sora-Plan's recommendation)."""
    return "euler_ancestral" if cfg.sample.scheduler == "auto" else cfg.sample.scheduler


def _pad_to(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - emb.shape[1]
    return F.pad(emb, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


@torch.no_grad()
def ddpm_videos(
    model: torch.nn.Module, text_encoder, codec, cfg: Config, prompts: Sequence[str], seeds: Sequence[int]
) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] for ``prompts[i]`` with ``seeds[i]`` at the config's
    ``data.num_frames x height x width`` and ``sample`` settings."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    t, h, w = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    sched_cfg, kind = scheduler_config(cfg), scheduler_kind(cfg)
    neg_emb, neg_mask = text_encoder.encode([cfg.sample.negative_prompt])
    guidance = float(cfg.sample.guidance)
    videos = []
    for prompt, seed in zip(prompts, seeds):
        # 1. The pipeline's noise for a batch of one, from the seed's CPU generator.
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((1, codec.latent_channels, t, h, w), generator=g).to(device)
        # 2. Text: [negative; prompt] padded to one length (padding masked out).
        emb, mask = text_encoder.encode([prompt])
        if guidance > 1.0:
            length = max(emb.shape[1], neg_emb.shape[1])
            e_u, m_u = _pad_to(neg_emb, neg_mask, length)
            e_c, m_c = _pad_to(emb, mask, length)
            emb, mask = torch.cat([e_u, e_c]), torch.cat([m_u, m_c])
        text, text_mask = emb.to(device, dtype), mask.to(device)

        def model_fn(x: torch.Tensor, tt: torch.Tensor, text=text, text_mask=text_mask) -> torch.Tensor:
            return model(x.to(dtype), tt, text, text_mask)

        # 3. The scheduler's loop, then decode.
        sampler = DDPMSampler(kind, sched_cfg, int(cfg.sample.steps))
        latent = sample_ddpm(model_fn, noise, sampler, guidance=guidance, generator=g)
        videos.append(codec.decode(latent).float().clamp(-1, 1).cpu())
    return torch.cat(videos)
