"""Samplers of discrete-time (DDPM-trained) denoisers: the maths of diffusers' ``EulerAncestralDiscreteScheduler``,
``EulerDiscreteScheduler``, ``DDIMScheduler`` (eta 0) and ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) as
small pure functions, and one loop that drives any of them with classifier-free guidance.

Everything is computed with the same float32 operations, in the same order, as diffusers 0.42 computes it, so a
frameloom step equals the diffusers scheduler's ``step`` on the same inputs (tests/test_opensora_plan_samplers.py
checks every step of every sampler). Open-Sora-Plan v1.3 samples through these diffusers classes
(``opensora/utils/sample_utils.py`` ``get_scheduler``): the config is its training schedule (``DDPMScheduler``
defaults: linear betas 0.0001..0.02, 1000 steps), its ``prediction_type`` and ``rescale_betas_zero_snr``, and
``timestep_spacing = "trailing"`` with zero terminal SNR, else ``"leading"``; its recommended sampler is
EulerAncestral, 100 steps, guidance 7.5.

Sources (formulas):
    * Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022, Algorithm 1
      (Euler in sigma = sqrt((1 - ab) / ab); the model sees ``x / sqrt(sigma^2 + 1)``) and k-diffusion's
      ``sample_euler_ancestral`` (``sigma_up``, ``sigma_down``).
    * Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021, eq. 12 with eta = 0.
    * Lu et al., "DPM-Solver++", 2022, Algorithm 2 (multistep second order, midpoint form as diffusers).
    * Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023 (zero-terminal-SNR
      betas, Algorithm 1, in diffusers' betas form; "trailing" spacing). The Euler and DPM schedulers then set
      the last ``alpha_bar`` to ``2**-24`` so that sigma stays finite (diffusers); DDIM keeps it at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from frameloom.errors import FrameloomError

__all__ = [
    "SCHEDULERS",
    "DDPMSampler",
    "SchedulerConfig",
    "ddim_step",
    "dpm_solver_pp_step",
    "euler_ancestral_step",
    "euler_step",
    "inference_timesteps",
    "rescale_betas_zero_terminal_snr",
    "sample_ddpm",
    "train_alphas_cumprod",
]

#: ``sample.scheduler`` names -> diffusers class they reproduce.
SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The diffusers scheduler config fields these samplers read (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def open_sora_plan(cls, prediction_type: str, rescale_betas_zero_snr: bool) -> SchedulerConfig:
        """Open-Sora-Plan's ``get_scheduler``: its training betas; trailing spacing with zero SNR."""
        return cls(
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            timestep_spacing="trailing" if rescale_betas_zero_snr else "leading",
        )


# --------------------------------------------------------------------------------------------------------
# schedules


def rescale_betas_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, on betas (diffusers' form, in the betas' dtype): shift ``sqrt(ab)`` so
    its last value is 0, scale it so its first is unchanged, and turn the result back into betas."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    s = alphas_cumprod.sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    ab = s**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def train_alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """``alpha_bar`` over the training timesteps in float32, computed as diffusers' schedulers compute it."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        raise FrameloomError(f"beta_schedule {cfg.beta_schedule!r} is not supported (linear, scaled_linear)")
    if cfg.rescale_betas_zero_snr:
        betas = rescale_betas_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _sigma_alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """The Euler and DPM schedulers' ``alpha_bar``: the last one set to ``2**-24`` with zero terminal SNR."""
    ab = train_alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ab[-1] = 2**-24
    return ab


def inference_timesteps(kind: str, cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """The descending timesteps of ``set_timesteps(steps)``: float32 for the Euler schedulers, int64 for DDIM
    and DPM-Solver (whose ``leading`` and ``linspace`` spacings count ``steps + 1`` points)."""
    n = cfg.num_train_timesteps
    spacing = cfg.timestep_spacing
    if not 1 <= steps <= n:
        raise FrameloomError(f"sample.steps must be in [1, {n}], got {steps}")
    if kind in ("euler_ancestral", "euler"):
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32)
            return ts + cfg.steps_offset
        if spacing == "trailing":
            ts = np.arange(n, 0, -n / steps).round().copy().astype(np.float32)
            return ts - 1
    elif kind == "ddim":
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(
                np.int64
            ) + cfg.steps_offset
        if spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif kind == "dpmsolver++":
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = n // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + cfg.steps_offset
        if spacing == "trailing":
            return np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    else:
        raise FrameloomError(f"sample.scheduler must be one of {', '.join(SCHEDULERS)}, not {kind!r}")
    raise FrameloomError(f"timestep spacing {spacing!r} is not supported (leading, trailing, linspace)")


def sigma_table(alphas_cumprod: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """``sigma = sqrt((1 - ab) / ab)`` interpolated at ``timesteps``, then a final 0 (float32, ``(steps + 1,)``)."""
    sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


# --------------------------------------------------------------------------------------------------------
# one step of each sampler (sample and model output float32; sigma / alpha_bar 0-dim float32 tensors)


def _x0_from_sigma(
    x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Clean-sample estimate in sigma parametrization (``x = x0 + sigma eps`` scaled by ``sqrt(sigma^2+1)``)."""
    if prediction_type == "epsilon":
        return x - sigma * pred
    if prediction_type == "v_prediction":
        return pred * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    raise FrameloomError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")


def euler_ancestral_step(
    x: torch.Tensor,
    pred: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Euler-ancestral (k-diffusion): deterministic Euler to ``sigma_down``, then noise of ``sigma_up``, with
    ``sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2)`` and ``sigma_down = sqrt(s'^2 - sigma_up^2)``."""
    x0 = _x0_from_sigma(x, pred, sigma, prediction_type)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (x - x0) / sigma
    x = x + derivative * (sigma_down - sigma)
    return x + noise * sigma_up


def euler_step(
    x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Euler (Karras et al. 2022, Algorithm 1 without churn): ``x += (x - x0) / sigma * (sigma' - sigma)``."""
    x0 = _x0_from_sigma(x, pred, sigma, prediction_type)
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma)


def ddim_step(
    x: torch.Tensor, pred: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """DDIM (eta 0): ``x' = sqrt(ab') x0 + sqrt(1 - ab') eps`` from the model's x0 and eps estimates."""
    beta_t = 1 - ab_t
    if prediction_type == "epsilon":
        x0 = (x - beta_t ** (0.5) * pred) / ab_t ** (0.5)
        eps = pred
    elif prediction_type == "v_prediction":
        x0 = (ab_t**0.5) * x - (beta_t**0.5) * pred
        eps = (ab_t**0.5) * pred + (beta_t**0.5) * x
    else:
        raise FrameloomError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
    return ab_prev ** (0.5) * x0 + (1 - ab_prev) ** (0.5) * eps


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients of a sigma: ``alpha = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma alpha``."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpm_solver_pp_x0(
    x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """DPM-Solver++ works on x0 predictions: convert the model output at ``sigma``."""
    alpha, sigma_t = _alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_t * pred
    raise FrameloomError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")


def dpm_solver_pp_step(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    sigmas: tuple[torch.Tensor, ...],
    order: int,
) -> torch.Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022, Alg. 2; midpoint form) from sigma ``sigmas[1]`` to
    ``sigmas[0]``. ``order`` 1: ``x' = (s_t / s_s) x - alpha_t (e^-h - 1) x0``; order 2 adds the midpoint
    correction with ``D1 = (m0 - m1) / r0`` from the previous x0 (``x0s[-2]``, at ``sigmas[2]``)."""
    alpha_t, sigma_t = _alpha_sigma(sigmas[0])
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[1])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    if order == 1:
        return (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0s[-1]
    alpha_s1, sigma_s1 = _alpha_sigma(sigmas[2])
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    m0, m1 = x0s[-1], x0s[-2]
    r0 = (lambda_s0 - lambda_s1) / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    return (
        (sigma_t / sigma_s0) * x
        - (alpha_t * (torch.exp(-h) - 1.0)) * d0
        - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    )


# --------------------------------------------------------------------------------------------------------
# the sampler


class DDPMSampler:
    """A diffusers-equivalent scheduler as a small state machine: ``timesteps``, ``init_noise_sigma``,
    ``scale_model_input(x, i)`` and ``step(pred, i, x, generator)`` for step index ``i``."""

    def __init__(self, kind: str, cfg: SchedulerConfig, steps: int):
        if kind not in SCHEDULERS:
            raise FrameloomError(f"sample.scheduler must be one of {', '.join(SCHEDULERS)}, not {kind!r}")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise FrameloomError(
                f"prediction_type must be epsilon or v_prediction, not {cfg.prediction_type!r}"
            )
        self.kind, self.cfg = kind, cfg
        self.timesteps = inference_timesteps(kind, cfg, steps)
        if kind == "ddim":
            self.alphas_cumprod = train_alphas_cumprod(cfg)
            self.final_alpha_cumprod = torch.tensor(1.0)  # set_alpha_to_one (diffusers' default)
            self.sigmas = None
        else:
            self.alphas_cumprod = _sigma_alphas_cumprod(cfg)
            self.sigmas = sigma_table(self.alphas_cumprod, self.timesteps)
        self._x0s: list[torch.Tensor] = []  # DPM-Solver++: previous x0 predictions

    @property
    def init_noise_sigma(self) -> torch.Tensor | float:
        """What the initial Gaussian noise is multiplied by."""
        if self.kind in ("euler_ancestral", "euler"):
            top = self.sigmas.max()
            return top if self.cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        return 1.0

    def model_timestep(self, i: int) -> float:
        """The timestep the denoiser is called with at step ``i``."""
        return float(self.timesteps[i])

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The Euler schedulers feed ``x / sqrt(sigma^2 + 1)``; DDIM and DPM-Solver feed ``x``."""
        if self.kind in ("euler_ancestral", "euler"):
            return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)
        return x

    def step(self, pred: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None):
        """``x`` at step ``i`` -> ``x`` at step ``i + 1`` (float32) given the (guided) model output ``pred``."""
        x, pred = x.float(), pred.float()
        p = self.cfg.prediction_type
        if self.kind == "euler_ancestral":
            noise = torch.randn(pred.shape, generator=generator, dtype=pred.dtype).to(pred.device)
            return euler_ancestral_step(x, pred, self.sigmas[i], self.sigmas[i + 1], p, noise)
        if self.kind == "euler":
            return euler_step(x, pred, self.sigmas[i], self.sigmas[i + 1], p)
        if self.kind == "ddim":
            t = int(self.timesteps[i])
            prev = t - self.cfg.num_train_timesteps // len(self.timesteps)
            ab_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            return ddim_step(x, pred, self.alphas_cumprod[t], ab_prev, p)
        # DPM-Solver++ 2M: first order at the first step and (final sigma 0) at the last.
        self._x0s = [*self._x0s[-1:], dpm_solver_pp_x0(x, pred, self.sigmas[i], p)]
        last = i == len(self.timesteps) - 1
        order = 1 if (len(self._x0s) < 2 or last) else 2
        window = (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1] if i > 0 else self.sigmas[i])
        return dpm_solver_pp_step(x, self._x0s, window, order)


@torch.no_grad()
def sample_ddpm(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sampler: DDPMSampler,
    *,
    guidance: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` ``(B, C, T, H, W)`` (a standard normal draw) with ``sampler``.

    ``model_fn(x, t)`` returns the prediction for ``x`` ``(2B, ...)`` = ``[uncond; cond]`` when ``guidance > 1``
    (``(B, ...)`` otherwise) at timesteps ``t`` ``(2B,)``; guidance is ``u + g (c - u)`` (diffusers' pipelines).
    ``generator`` draws EulerAncestral's step noise (the same generator that drew ``noise``, as the pipelines
    pass it to the scheduler). Returns the final latents in float32.
    """
    use_cfg = guidance > 1.0
    x = noise.float() * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        x_in = sampler.scale_model_input(x, i)
        x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
        t = torch.full((x_in.shape[0],), sampler.model_timestep(i), device=x.device, dtype=torch.float32)
        pred = model_fn(x_in, t).float()
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        x = sampler.step(pred, i, x, generator)
    return x
