"""Pyramid Flow sampling (jy0205/Pyramid-Flow ``PyramidDiTForVideoGeneration.generate`` / ``generate_i2v``).

A clip (or unit) starts at the coarsest stage from the coarsest level of a full-size noise pyramid; each stage
runs Euler steps ``x += (r_next - r) * v`` over its local ratios, and between stages the latent is upsampled
(nearest) and renoised ``x = a * x + b * block_noise`` (``objectives.pyramid.jump_coefficients``).

- ``full``: the whole clip at once (models trained with ``objective.name: pyramid_flow``).
- ``ar``: unit by unit (``pyramid_flow_ar``): the first frame with ``first_frame_steps`` and
  ``sample.guidance``, every later unit with ``video_steps`` and ``video_guidance``, conditioned on the history
  pyramid of the units generated so far (clean). With ``sample.image`` the first frame is that image.
- a model trained with plain ``flow`` is sampled as one full-resolution stage from ratio 1 to 0.

Each video's noise (the start noise and every block noise) comes from its own CPU generator seeded with its
seed, so a video depends only on its prompt, seed and settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from frameloom.errors import FrameloomError
from frameloom.objectives.pyramid import (
    PyramidSchedule,
    ar_history,
    block_noise,
    jump_coefficients,
    latent_pyramid,
    noise_pyramid,
    stage_ratios,
    stage_timesteps,
    upsample2,
)

__all__ = ["PyramidSampleOptions", "denoise_stages", "generate_ar", "generate_full", "guided_velocity"]

#: (x (B, C, t, h, w), model timestep (scalar tensor), history clips) -> velocity like x
Velocity = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]


@dataclass
class PyramidSampleOptions:
    """``sample.pyramid``: the sampler's knobs (defaults = upstream's inference defaults)."""

    mode: str = "auto"
    """`auto` (ar for a pyramid_flow_ar run, full for pyramid_flow, one stage for flow), `ar` or `full`."""
    first_frame_steps: list[int] = field(default_factory=lambda: [20, 20, 20])
    """Euler steps per stage for the first frame (and every stage of a `full` clip)."""
    video_steps: list[int] = field(default_factory=lambda: [10, 10, 10])
    """Euler steps per stage for each later unit (ar)."""
    video_guidance: float = 5.0
    """Classifier-free guidance of the later units (ar); the first frame uses sample.guidance."""
    prompt_suffix: str = ""
    """Appended to every prompt (upstream appends ", hyper quality, Ultra HD, 8K")."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PyramidSampleOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FrameloomError(
                f"unknown sample.pyramid key(s) {unknown}; valid: {', '.join(sorted(names))}"
            )
        opts = cls(**values)
        if opts.mode not in ("auto", "ar", "full"):
            raise FrameloomError(f"sample.pyramid.mode must be auto, ar or full, not {opts.mode!r}")
        if min(opts.first_frame_steps + opts.video_steps) < 1:
            raise FrameloomError("sample.pyramid steps must be >= 1 per stage")
        return opts


def guided_velocity(
    model: torch.nn.Module,
    cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    guidance: float,
) -> Velocity:
    """Classifier-free guidance ``v_u + g (v_c - v_u)`` (Ho & Salimans 2022) in one batched call; ``cond`` and
    ``uncond`` are (tokens (B, L, D), mask (B, L), pooled (B, P)) padded to one length."""
    dtype = next(model.parameters()).dtype
    if uncond is None or guidance == 1.0:
        emb, mask, pooled = cond
    else:
        emb, mask, pooled = (torch.cat([u, c]) for u, c in zip(uncond, cond))

    def velocity(x: torch.Tensor, t: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        n = emb.shape[0] // x.shape[0]
        xs = torch.cat([x] * n).to(dtype)
        hs = [torch.cat([h] * n).to(dtype) for h in history]
        v = model(
            xs, t.expand(xs.shape[0]).to(dtype), emb.to(dtype), mask, pooled=pooled.to(dtype), history=hs
        )
        v = v.float()
        if n == 1:
            return v
        vu, vc = v.chunk(2)
        return vu + guidance * (vc - vu)

    return velocity


def _block_noise_per_sample(shape, gamma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.cat([block_noise((1, *shape[1:]), gamma, g) for g in generators])


def denoise_stages(
    velocity: Velocity,
    x: torch.Tensor,
    schedule: PyramidSchedule,
    steps: Sequence[int],
    generators: Sequence[torch.Generator],
    history: Sequence[list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Run every stage from the coarsest noise ``x (B, C, t, h0, w0)`` (fp32) to the full-resolution latent:
    per stage k > 0 the jump (nearest up, ``a x + b block_noise``), then ``steps[k]`` Euler steps over the
    stage's ratios with its timesteps. ``history[k]``: the clips the model sees before x at stage k."""
    for k in range(schedule.stages):
        if k > 0:
            a, b = jump_coefficients(schedule.original_start_sigmas[k], schedule.gamma)
            x = upsample2(x)
            x = a * x + b * _block_noise_per_sample(x.shape, schedule.gamma, generators).to(x.device)
        ts = stage_timesteps(schedule, k, steps[k]).to(x.device)
        rs = stage_ratios(schedule, steps[k])
        for i in range(steps[k]):
            v = velocity(x, ts[i].float(), history[k] if history else [])
            x = x + float(rs[i + 1] - rs[i]) * v
    return x


def coarse_noise(shape: Sequence[int], stages: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Per-sample full-size Gaussian noise ``(B, C, T, H, W)`` brought to the coarsest stage (the noise
    pyramid's first level: bilinear halving times 2, as upstream prepares its start latents), fp32."""
    full = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators])
    return noise_pyramid(full, stages)[0]


def generate_full(
    velocity: Velocity,
    shape: Sequence[int],
    schedule: PyramidSchedule,
    steps: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device,
) -> torch.Tensor:
    """A whole clip ``shape = (B, C, T, H, W)`` through the stages at once."""
    x = coarse_noise(shape, schedule.stages, generators).to(device)
    return denoise_stages(velocity, x, schedule, steps, generators)


def generate_ar(
    first: Velocity,
    video: Velocity,
    shape: Sequence[int],
    schedule: PyramidSchedule,
    first_steps: Sequence[int],
    video_steps: Sequence[int],
    frame_per_unit: int,
    generators: Sequence[torch.Generator],
    device: torch.device,
    first_frame: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Unit by unit: ``first`` (first-frame guidance) for frame 0 unless ``first_frame (B, C, 1, H, W)`` is
    given (image-to-video), then ``video`` for each later unit with the history pyramid of what was generated
    (upstream ``generate`` / ``generate_i2v``). Returns ``(B, C, T, H, W)``."""
    b, c, t, h, w = shape
    f = frame_per_unit
    if (t - 1) % f:
        raise FrameloomError(f"{t} latent frames do not split into 1 + n units of {f} frames")
    noise = coarse_noise(shape, schedule.stages, generators).to(device)  # (B, C, T, h0, w0)
    units = 1 + (t - 1) // f
    done: list[torch.Tensor] = []
    for u in tqdm(range(units), desc="units", disable=not progress):
        if u == 0:
            x = (
                first_frame.float()
                if first_frame is not None
                else denoise_stages(first, noise[:, :, :1], schedule, first_steps, generators)
            )
        else:
            past = latent_pyramid(torch.cat(done, dim=2), schedule.stages)  # clean, coarsest first
            history = [ar_history(past, k, f) for k in range(schedule.stages)]
            start = 1 + (u - 1) * f
            x = denoise_stages(
                video, noise[:, :, start : start + f], schedule, video_steps, generators, history
            )
        done.append(x)
    return torch.cat(done, dim=2)
