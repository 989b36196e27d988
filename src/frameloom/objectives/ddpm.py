"""DDPM (discrete-time diffusion) with v-prediction: small pure functions plus an objective built from a
diffusers scheduler config.

Time convention: integer timesteps ``t in [0, N)`` (``N = num_train_timesteps``, 1000 for every family here);
``t = 0`` is nearly clean data, ``t = N - 1`` is (with zero-terminal-SNR) pure noise. ``alpha_bar[t]`` is the
cumulative product of ``1 - beta``; the forward process is ``x_t = sqrt(ab) x0 + sqrt(1 - ab) noise``.

Sources:
    * Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020 (forward process).
    * Salimans & Ho, "Progressive Distillation", 2022, sec. 4 (v-prediction: ``v = sqrt(ab) noise -
      sqrt(1 - ab) x0`` and ``x0 = sqrt(ab) x_t - sqrt(1 - ab) v``).
    * Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023, Algorithm 1
      (zero-terminal-SNR rescale) and Table 2 ("trailing" timestep spacing).
    * Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021, eq. 12 with eta = 0 (sampling step).
    * CogVideoX (THUDM/CogVideo, diffusers' ``CogVideoXDDIMScheduler``), as recorded in SEED_FACTS.md:
      scaled-linear betas 0.00085..0.012, an SNR shift ``alpha_bar / (s + (1 - s) alpha_bar)`` before the
      zero-terminal-SNR rescale, and the training loss ``mean((x0_pred - x0)^2 / (1 - alpha_bar))``.
    * Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023, sec. 3.4 / 4.2
      (``min(SNR, gamma)`` divided by ``SNR`` for epsilon and by ``SNR + 1`` for v-prediction), as diffusers'
      ``compute_snr`` and Open-Sora-Plan v1.3's ``train_t2v_diffusers.py`` compute it.
    * Open-Sora-Plan v1.3 (PKU-YuanGroup/Open-Sora-Plan, ``opensora/utils/utils.py``
      ``explicit_uniform_sampling``): one stratum of the timestep range per data-parallel rank.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frameloom.errors import FrameloomError
from frameloom.objectives.base import StepContext, TrainingInputs

__all__ = [
    "DDPMObjective",
    "DDPMSchedule",
    "VPredictionDDPM",
    "add_noise",
    "alphas_cumprod_from_betas",
    "cogvideox_x0_loss",
    "compute_snr",
    "ddpm_objective",
    "epsilon_target",
    "ddim_step",
    "ddim_timesteps",
    "explicit_uniform_timesteps",
    "linear_betas",
    "min_snr_loss",
    "min_snr_weights",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "snr_shift",
    "v_target",
    "x0_from_v",
]


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(B,)`` coefficient as ``(B, 1, ..., 1)`` in ``like``'s dtype/device (scalars stay)."""
    a = torch.as_tensor(a, device=like.device, dtype=like.dtype)
    return a if a.dim() == 0 else a.reshape(a.shape[0], *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------------------------
# noise schedule


def linear_betas(beta_start: float, beta_end: float, num_steps: int) -> torch.Tensor:
    """``betas = linspace(beta_start, beta_end, N)`` in float64 (DDPM's schedule; diffusers'
    ``DDPMScheduler`` default 0.0001..0.02, N = 1000, which Open-Sora-Plan v1.3 trains with)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(beta_start: float, beta_end: float, num_steps: int) -> torch.Tensor:
    """``betas = linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2`` in float64 (Stable Diffusion's
    "scaled_linear"; CogVideoX: 0.00085..0.012, N = 1000)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` (DDPM eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr_shift(alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """Divide the SNR by ``scale``: ``ab' = ab / (scale + (1 - scale) ab)`` (CogVideoX ``snr_shift_scale``).

    From ``snr = ab / (1 - ab)`` and ``snr' = snr / scale``: ``ab' = snr' / (1 + snr')``. ``scale = 1`` is the
    identity; CogVideoX-2B uses 3.0 (more noise at every t), CogVideoX-5B 1.0.
    """
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, on ``alpha_bar``: shift ``sqrt(ab)`` so its last value is 0 and scale it
    so its first value is unchanged, then square. The last timestep becomes pure noise (SNR 0)."""
    s = alphas_cumprod.sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    return s**2


# --------------------------------------------------------------------------------------------------------
# forward process, v-prediction and the CogVideoX loss


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ab) x0 + sqrt(1 - ab) noise`` with per-sample ``alpha_bar`` ``(B,)`` (DDPM eq. 4)."""
    ab = _bcast(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(ab) noise - sqrt(1 - ab) x0`` (Salimans & Ho 2022)."""
    ab = _bcast(alpha_bar, x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate from a v prediction: ``x0 = sqrt(ab) x_t - sqrt(1 - ab) v`` (diffusers'
    ``get_velocity(v, x_t, t)``, which CogVideoX's trainer uses exactly this way)."""
    ab = _bcast(alpha_bar, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def cogvideox_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """CogVideoX's loss: per sample ``mean((x0_pred - x0)^2 / (1 - ab))`` over its elements, then the batch
    mean. Computed in float32. (With v-prediction this equals the plain MSE on v: ``x0_pred - x0 =
    -sqrt(1 - ab) (v_pred - v)``, so the weight ``1 / (1 - ab)`` cancels the ``(1 - ab)`` factor.)"""
    w = 1.0 / (1.0 - _bcast(alpha_bar, x0.float()))
    per_sample = (w * (x0_pred.float() - x0.float()).pow(2)).flatten(1).mean(dim=1)  # (B,)
    return per_sample.mean()


# --------------------------------------------------------------------------------------------------------
# DDIM sampling (eta = 0), as CogVideoXDDIMScheduler steps


def ddim_timesteps(num_train: int, steps: int, spacing: str = "trailing", offset: int = 0) -> list[int]:
    """The descending integer timesteps of a ``steps``-step sampler (Lin et al. 2023, Table 2).

    ``trailing``: ``round(arange(N, 0, -N / steps)) - 1`` (includes ``N - 1``; CogVideoX's setting);
    ``leading``: ``arange(steps) * (N // steps)`` reversed, plus ``offset``; ``linspace``:
    ``round(linspace(0, N - 1, steps))`` reversed.
    """
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (num_train // steps)).round()[::-1].astype(np.int64) + offset
    elif spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (trailing, leading, linspace)")
    return [int(t) for t in ts]


def ddim_step(
    x_t: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) to the previous timestep, in CogVideoX's form:
    ``x_prev = a x_t + b x0_pred`` with ``a = sqrt((1 - ab_prev) / (1 - ab_t))`` and
    ``b = sqrt(ab_prev) - sqrt(ab_t) a`` (DDIM eq. 12 with the noise estimate written through x_t and x0)."""
    a = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
    b = math.sqrt(alpha_bar_prev) - math.sqrt(alpha_bar_t) * a
    return a * x_t + b * x0_pred


# --------------------------------------------------------------------------------------------------------
# the schedule of a model directory


@dataclass
class DDPMSchedule:
    """A discrete noise schedule as a diffusers DDPM/DDIM scheduler config describes it.

    ``alphas_cumprod`` (float64, ``(N,)``) already carries the SNR shift and the zero-terminal-SNR rescale.
    ``final_alpha_cumprod`` is the "previous" alpha_bar of the last sampling step (1 when
    ``set_alpha_to_one``).
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    final_alpha_cumprod: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DDPMSchedule:
        """Build from a scheduler config dict (``scheduler_config.json``), supporting what CogVideoX's
        ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` configs use."""
        n = int(config.get("num_train_timesteps", 1000))
        schedule = config.get("beta_schedule", "scaled_linear")
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = scaled_linear_betas(start, end, n)
        elif schedule == "linear":
            betas = linear_betas(start, end, n)
        else:
            raise FrameloomError(f"scheduler config: beta_schedule {schedule!r} is not supported")
        ab = alphas_cumprod_from_betas(betas)
        # CogVideoX's schedulers always apply the shift (default 3.0); plain DDPM/DDIM configs lack the key.
        is_cogvideox = str(config.get("_class_name", "")).startswith("CogVideoX")
        scale = config.get("snr_shift_scale", 3.0 if is_cogvideox else 1.0)
        ab = snr_shift(ab, float(scale))
        if config.get("rescale_betas_zero_snr", False):
            ab = rescale_zero_terminal_snr(ab)
        final = 1.0 if config.get("set_alpha_to_one", True) else float(ab[0])
        return cls(
            alphas_cumprod=ab,
            prediction_type=str(config.get("prediction_type", "epsilon")),
            timestep_spacing=str(config.get("timestep_spacing", "leading")),
            steps_offset=int(config.get("steps_offset", 0)),
            final_alpha_cumprod=final,
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str = "scheduler") -> DDPMSchedule:
        """Read ``<directory>/<subfolder>/scheduler_config.json``."""
        path = Path(directory) / subfolder / "scheduler_config.json"
        if not path.is_file():
            raise FrameloomError(f"no scheduler config at {path}")
        return cls.from_config(json.loads(path.read_text()))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` at integer timesteps ``t`` ``(B,)`` as float32 on ``t``'s device."""
        return self.alphas_cumprod.to(t.device)[t.long()].float()

    def sample_timesteps(
        self, n: int, generator: torch.Generator, low: int = 0, high: int | None = None
    ) -> torch.Tensor:
        """``n`` uniform integer timesteps in ``[low, high)`` (default ``[0, N)``; CogVideoX's trainer:
        ``torch.randint``)."""
        high = self.num_train_timesteps if high is None else high
        return torch.randint(low, high, (n,), generator=generator, device=generator.device)


class VPredictionDDPM:
    """The v-prediction DDPM objective with CogVideoX's x0-space loss weighting.

    ``draw``: timesteps ``t ~ U{0..N-1}`` (drawn first), noise (second), ``x_t = sqrt(ab) x0 + sqrt(1-ab) eps``,
    target ``v``; ``extras["alpha_bar"]`` holds ``ab`` ``(B,)`` and ``extras["x_noisy"]`` the noisy latent
    (equal to ``x_t`` here; families that add conditioning channels to ``x_t`` keep the plain one there).
    ``loss``: ``x0_pred = sqrt(ab) x_noisy - sqrt(1-ab) pred``; ``mean((x0_pred - x0)^2 / (1 - ab))``.
    """

    def __init__(self, schedule: DDPMSchedule, t_range: tuple[float, float] = (0.0, 1.0)):
        """``t_range = (min_t, max_t)``: timesteps are drawn from ``[round(min_t N), round(max_t N))``."""
        if schedule.prediction_type != "v_prediction":
            raise FrameloomError(
                f"scheduler prediction_type is {schedule.prediction_type!r}; this objective needs v_prediction"
            )
        self.schedule = schedule
        n = schedule.num_train_timesteps
        self.t_low, self.t_high = round(t_range[0] * n), round(t_range[1] * n)
        if not 0 <= self.t_low < self.t_high <= n:
            raise FrameloomError(f"objective.min_t/max_t {t_range} leave no timestep of {n}")

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        t = self.schedule.sample_timesteps(x0.shape[0], generator, self.t_low, self.t_high)  # (B,) int64
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        ab = self.schedule.alpha_bar(t)  # (B,) float32
        x_t = add_noise(x0, noise, ab)
        inputs = TrainingInputs(x0=x0, noise=noise, x_t=x_t, t=t, target=v_target(x0, noise, ab))
        inputs.extras["alpha_bar"] = ab
        inputs.extras["x_noisy"] = x_t
        return inputs

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        ab = inputs.extras["alpha_bar"]
        x0_pred = x0_from_v(inputs.extras["x_noisy"].float(), pred.float(), ab)
        return cogvideox_x0_loss(x0_pred, inputs.x0, ab)


# --------------------------------------------------------------------------------------------------------
# epsilon / v-prediction with min-SNR weighting and rank-stratified timesteps (Open-Sora-Plan v1.3)


def epsilon_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction target: the noise itself (DDPM eq. 14)."""
    return noise


def compute_snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``SNR(t) = alpha_bar / (1 - alpha_bar)`` at integer timesteps ``t`` ``(B,)``, float32, computed as
    diffusers' ``training_utils.compute_snr`` does: ``(sqrt(ab) / sqrt(1 - ab)) ** 2``. 0 where ab = 0."""
    ab = alphas_cumprod.to(t.device)[t.long()]
    return (ab.sqrt() / (1.0 - ab).sqrt()).float() ** 2


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon
    prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction (diffusers' and Open-Sora-Plan's form).

    At SNR = 0 (the last timestep of a zero-terminal-SNR schedule) the epsilon weight is 0/0 upstream (NaN);
    frameloom uses its limit, 1.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "epsilon":
        return torch.where(
            snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr)
        )
    raise FrameloomError(
        f"min-SNR weighting: prediction_type must be epsilon or v_prediction, not {prediction_type!r}"
    )


def min_snr_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(w_b * m * (pred - target)^2) / sum(m)`` over a batch ``(B, ...)`` in float32: the per-element MSE
    weighted per sample and averaged over the valid (unpadded) elements, as Open-Sora-Plan v1.3 averages over
    its attention mask. ``weights`` None: 1; ``mask`` None: every element (then it is the plain mean)."""
    err = (pred.float() - target.float()).pow(2).flatten(1)  # (B, n)
    if weights is not None:
        err = err * weights.float().reshape(-1, 1)
    if mask is None:
        return err.mean()
    m = mask.float().expand_as(pred).flatten(1) if mask.dim() == pred.dim() else mask.float().flatten(1)
    return (err * m).sum() / m.sum()


def explicit_uniform_timesteps(
    num_train: int, strata: int, stratum: int, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` integer timesteps from stratum ``stratum`` of ``strata`` equal slices of ``[0, num_train)``:
    ``round(U(T s / S - 0.5, T (s + 1) / S - 0.5))`` (Open-Sora-Plan's ``explicit_uniform_sampling``, with
    the rank as stratum), drawn from ``generator`` and clamped to ``[0, num_train - 1]``. ``round`` is
    half-to-even, as Python's."""
    if not 0 <= stratum < strata:
        raise ValueError(f"stratum {stratum} outside [0, {strata})")
    width = num_train / strata
    lower, upper = width * stratum - 0.5, width * (stratum + 1) - 0.5
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.round(lower + u * (upper - lower)).long().clamp(0, num_train - 1)


TIMESTEP_SAMPLING = ("uniform", "explicit_uniform")


class DDPMObjective:
    """DDPM training with epsilon or v-prediction, optional min-SNR-gamma weighting and uniform or
    rank-stratified timesteps (Open-Sora-Plan v1.3's recipe with ``v_prediction``, ``snr_gamma=5``,
    ``explicit_uniform``).

    ``draw``: timesteps (first), noise (second), ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``, target ``eps`` or
    ``v``; ``extras["weights"]`` the per-sample min-SNR weights (absent without ``snr_gamma``).
    ``explicit_uniform``: the step's global batch is cut into ``data_world x grad_accum`` micro-batches
    (``StepContext.slot``), each drawing from its own equal slice of ``[0, N)``: with one micro-step per rank
    this is Open-Sora-Plan's one stratum per rank; keyed by the slot, so 2 processes and 1 process with
    accumulation 2 draw the same timesteps, and the ranks of a sequence-parallel group (one slot) share theirs.
    ``loss``: ``min_snr_loss`` (per-sample weights, mean over all elements).
    """

    def __init__(
        self,
        schedule: DDPMSchedule,
        *,
        snr_gamma: float | None = None,
        timestep_sampling: str = "uniform",
        grad_accum: int = 1,
    ):
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise FrameloomError(
                f"objective.prediction_type must be epsilon or v_prediction, not {schedule.prediction_type!r}"
            )
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise FrameloomError(
                f"objective.timestep_sampling for ddpm must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                f"not {timestep_sampling!r}"
            )
        if snr_gamma is not None and snr_gamma <= 0:
            raise FrameloomError(f"objective.snr_gamma must be > 0 (or null), not {snr_gamma}")
        self.schedule = schedule
        self.snr_gamma = snr_gamma
        self.timestep_sampling = timestep_sampling
        self.grad_accum = int(grad_accum)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def sample_timesteps(self, n: int, generator: torch.Generator, ctx: StepContext | None) -> torch.Tensor:
        if self.timestep_sampling == "uniform":
            return self.schedule.sample_timesteps(n, generator)
        ctx = ctx or StepContext()
        strata = ctx.data_world * self.grad_accum
        return explicit_uniform_timesteps(
            self.schedule.num_train_timesteps, strata, ctx.slot % strata, n, generator
        )

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        t = self.sample_timesteps(x0.shape[0], generator, ctx)  # (B,) int64
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        ab = self.schedule.alpha_bar(t)  # (B,) float32
        x_t = add_noise(x0, noise, ab)
        target = v_target(x0, noise, ab) if self.prediction_type == "v_prediction" else noise
        inputs = TrainingInputs(x0=x0, noise=noise, x_t=x_t, t=t, target=target)
        inputs.extras["alpha_bar"] = ab
        if self.snr_gamma is not None:
            snr = compute_snr(self.schedule.alphas_cumprod, t)
            inputs.extras["weights"] = min_snr_weights(snr, self.snr_gamma, self.prediction_type)
        return inputs

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        return min_snr_loss(pred, inputs.target, inputs.extras.get("weights"))


def ddpm_objective(
    *,
    prediction_type: str = "v_prediction",
    rescale_betas_zero_snr: bool = False,
    snr_gamma: float | None = None,
    timestep_sampling: str = "uniform",
    grad_accum: int = 1,
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
) -> DDPMObjective:
    """A ``DDPMObjective`` on the schedule of a diffusers ``DDPMScheduler`` with these settings (defaults:
    its own, linear 0.0001..0.02 over 1000 steps, which Open-Sora-Plan v1.3 trains with)."""
    schedule = DDPMSchedule.from_config(
        {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "prediction_type": prediction_type,
            "rescale_betas_zero_snr": rescale_betas_zero_snr,
            "timestep_spacing": "trailing" if rescale_betas_zero_snr else "leading",
        }
    )
    return DDPMObjective(
        schedule, snr_gamma=snr_gamma, timestep_sampling=timestep_sampling, grad_accum=grad_accum
    )
