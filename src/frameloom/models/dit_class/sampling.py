"""Sampling a learned-variance DDPM: ancestral DDPM (DiT's default, 250 respaced steps) and DDIM, with
classifier-free guidance on the first ``guidance_channels`` latent channels (DiT applies it to 3 of SD-VAE's
4 channels "for exact reproducibility"; ``None`` guides them all).

Guidance follows DiT's ``forward_with_cfg``: one forward pass over ``[x, x]`` with labels ``[y, null]``;
``eps_g = eps_u + s (eps_c - eps_u)`` on the guided channels; the other eps channels and the variance output
are the conditional half's. Each sample draws its initial and per-step noise from its own CPU generator
(seeded by its seed), so a sample depends on its class, seed and settings only, not on its batch or device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from frameloom.errors import FrameloomError
from frameloom.objectives.iddpm import (
    DiffusionTables,
    ddim_step,
    linear_betas,
    p_mean_variance,
    respace,
    space_timesteps,
)

__all__ = ["SAMPLERS", "guided_output", "sample_class_latents"]

SAMPLERS = ("ddpm", "ddim")


def guided_output(
    out: torch.Tensor, scale: float, channels: int | None, latent_channels: int
) -> torch.Tensor:
    """``out`` (2B, 2C, ...) = [conditional; unconditional] -> guided (B, 2C, ...) (DiT ``forward_with_cfg``)."""
    cond, uncond = out.chunk(2, dim=0)
    k = latent_channels if channels is None else min(int(channels), latent_channels)
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One standard normal draw per sample from its own CPU generator, stacked: (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)


@torch.no_grad()
def sample_class_latents(
    model: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    seeds: Sequence[int],
    latent_shape: tuple[int, ...],
    *,
    null_label: int,
    steps: int = 250,
    guidance: float = 1.0,
    guidance_channels: int | None = 3,
    sampler: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = False,
    num_train_timesteps: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """Latents (B, C, ...) for class ``labels`` (B,) with per-sample ``seeds``; ``latent_shape`` is (C, ...).

    ``model(x, t, class_labels=y)`` returns ``(B, 2C, ...)``; ``t`` are original timesteps (float). ``steps``
    respaces the ``num_train_timesteps`` linear schedule (DiT ``space_timesteps``); DDIM uses the same spaced
    schedule with ``eta`` (0: deterministic).
    """
    if sampler not in SAMPLERS:
        raise FrameloomError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if len(seeds) != labels.shape[0]:
        raise ValueError("one seed per label")
    if not 1 <= steps <= num_train_timesteps:
        raise FrameloomError(f"sampling steps must be in 1..{num_train_timesteps}, got {steps}")
    device = labels.device
    base = DiffusionTables(linear_betas(num_train_timesteps))
    tables = respace(base, space_timesteps(num_train_timesteps, [steps]))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _noise(generators, tuple(latent_shape), device, torch.float32)  # (B, C, ...)
    c = latent_shape[0]
    guide = guidance != 1.0
    null = torch.full_like(labels, null_label)
    for i in tqdm(range(tables.num_timesteps - 1, -1, -1), disable=not progress, desc="sample", unit="step"):
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)  # index into the spaced tables
        t_model = tables.at("timestep_map", t, t).reshape(-1)  # the original timestep the model knows
        # 1. The model's (eps, v), guided.
        if guide:
            out = model(
                torch.cat([x, x]), torch.cat([t_model, t_model]), class_labels=torch.cat([labels, null])
            )
            out = guided_output(out.float(), guidance, guidance_channels, c)
        else:
            out = model(x, t_model, class_labels=labels).float()
        # 2. p(x_{t-1} | x_t) and one step.
        p = p_mean_variance(tables, out, x, t, clip_denoised=clip_denoised)
        if sampler == "ddpm":
            nonzero = float(i != 0)
            x = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * _noise(
                generators, x.shape[1:], device, x.dtype
            )
        else:
            z = _noise(generators, x.shape[1:], device, x.dtype) if eta > 0 else None
            x = ddim_step(tables, x, t, p["pred_x0"], eta, z)
    return x
