"""Improved DDPM with learned-range variance: the maths of DiT / fast-DiT training and sampling.

Time convention (as upstream): integer timesteps ``t in [0, N)``; ``t = 0`` is the first noising step.
``alpha_bar[t] = prod_{s <= t} (1 - beta_s)``; the forward process is
``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``. Tables are computed in float64 and gathered per
timestep, then cast to float32 (upstream ``_extract_into_tensor``).

The denoiser predicts ``(eps, v)`` stacked on the channel axis; ``v in [-1, 1]`` interpolates the log
variance of ``p(x_{t-1} | x_t)`` between the posterior variance ``beta~_t`` and ``beta_t``. The training loss
is the improved-DDPM "hybrid": ``mse(eps) + L_vb`` where the VB term sees the mean prediction with its
gradient stopped (so it trains the variance only).

Sources:
    * Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020: linear betas 1e-4..0.02 (scaled by
      1000 / N), eq. 4 (q_sample), eqs. 6-7 (posterior mean and variance ``beta~_t``).
    * Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021: eq. 15 (learned-range
      variance ``exp(v' log beta_t + (1 - v') log beta~_t)``, ``v' = (v + 1) / 2``), eq. 16 (hybrid loss),
      sec. 4 (respacing: a subsequence S of timesteps with ``beta_S_i = 1 - alpha_bar_S_i / alpha_bar_S_{i-1}``),
      the discretized Gaussian decoder ``L_0`` of DDPM sec. 3.3 with the tanh CDF approximation, and the KL
      between Gaussians of ``L_{t-1}``; losses in bits (divided by ln 2). The code of facebookresearch/DiT
      (``diffusion/gaussian_diffusion.py``, ``respace.py``, ``diffusion_utils.py``) is the reference the tests
      compare with.
    * Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021, eq. 12 (DDIM step with eta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from frameloom.errors import FrameloomError
from frameloom.objectives.base import StepContext, TrainingInputs

__all__ = [
    "DiffusionTables",
    "ImprovedDDPM",
    "approx_standard_normal_cdf",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "learned_range_log_variance",
    "linear_betas",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "space_timesteps",
    "vb_terms_bits",
]


# --------------------------------------------------------------------------------------------------------
# schedule


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, extended to any N: ``linspace(s * 1e-4, s * 0.02, N)`` with ``s = 1000 / N``
    (DiT's ``get_named_beta_schedule("linear", N)``), float64."""
    if num_steps < 1:
        raise FrameloomError(f"the diffusion needs at least 1 step, got {num_steps}")
    scale = 1000.0 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


@dataclass
class DiffusionTables:
    """Every per-timestep coefficient of a discrete diffusion with betas ``beta_t`` (float64, shape (N,)).

    ``timestep_map[i]`` is the timestep of the *original* process that index ``i`` stands for (the identity
    for an unspaced process); the denoiser always receives original timesteps.
    """

    betas: torch.Tensor
    timestep_map: torch.Tensor = None  # type: ignore[assignment]
    _device_cache: dict[Any, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        b = self.betas.to(torch.float64)
        if b.dim() != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise FrameloomError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = b
        if self.timestep_map is None:
            self.timestep_map = torch.arange(len(b))
        a = 1.0 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([b.new_ones(1), ab[:-1]])
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = ab_prev
        # DDPM eq. 7: beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t); it is 0 at t = 0, so its log is clipped to
        # the value at t = 1 (upstream posterior_log_variance_clipped)
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        if len(b) > 1:
            pv = self.posterior_variance
            self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        else:  # a single step has no posterior (upstream leaves the table empty); beta itself is the bound
            self.posterior_log_variance_clipped = torch.log(b)
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * a.sqrt() / (1.0 - ab)
        self.log_betas = torch.log(b)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    NAMES = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "log_betas",
    )

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """``name``'s float32 table on ``device`` (cast once per device: no float64 on the accelerator)."""
        tables = self._device_cache.get(device)
        if tables is None:
            extra = {
                "sqrt_alphas_cumprod": self.alphas_cumprod.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1.0 - self.alphas_cumprod).sqrt(),
                "sqrt_recip_alphas_cumprod": (1.0 / self.alphas_cumprod).sqrt(),
                "sqrt_recipm1_alphas_cumprod": (1.0 / self.alphas_cumprod - 1.0).sqrt(),
                "timestep_map": self.timestep_map.to(torch.float64),
            }
            all_tables = {n: getattr(self, n) for n in self.NAMES} | extra
            tables = {n: v.to(torch.float32).to(device) for n, v in all_tables.items()}
            self._device_cache[device] = tables
        return tables[name]

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The coefficient ``name`` at timesteps ``t`` (B,), shaped ``(B, 1, ..., 1)`` to broadcast with ``like``."""
        values = self.table(name, like.device)[t.to(like.device).long()]  # (B,)
        return values.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """The retained timesteps of a respaced process (improved DDPM sec. 4; DiT ``space_timesteps``).

    ``section_counts`` splits ``[0, N)`` into equal sections (the first ``N % len`` one step longer) and takes
    that many evenly spaced steps from each, rounding ``start + round(k * (size - 1) / (count - 1))``;
    ``"ddimK"`` takes the integer stride that gives exactly K steps. Returns the sorted list.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise FrameloomError(
                f"cannot take exactly {wanted} of {num_timesteps} steps with an integer stride"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise FrameloomError(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(steps))


def respace(tables: DiffusionTables, use_timesteps: list[int]) -> DiffusionTables:
    """The process restricted to ``use_timesteps``: ``beta'_i = 1 - ab[S_i] / ab[S_{i-1}]`` (ab[S_-1] = 1), so
    that the spaced process has exactly the original ``alpha_bar`` at each kept step (improved DDPM sec. 4)."""
    keep = sorted(set(int(t) for t in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= tables.num_timesteps:
        raise FrameloomError(f"respacing needs timesteps in [0, {tables.num_timesteps}), got {keep[:3]}...")
    ab = tables.alphas_cumprod[keep]
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    original = tables.timestep_map[keep]
    return DiffusionTables(betas=1.0 - ab / prev, timestep_map=original)


# --------------------------------------------------------------------------------------------------------
# forward process, posterior, parameterisations


def q_sample(tables: DiffusionTables, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` (DDPM eq. 4)."""
    return (
        tables.at("sqrt_alphas_cumprod", t, x0) * x0
        + tables.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )


def q_posterior_mean_variance(
    tables: DiffusionTables, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x0)`` (DDPM eqs. 6-7):
    ``mu~ = beta_t sqrt(ab_{t-1}) / (1 - ab_t) x0 + (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t) x_t``."""
    mean = tables.at("posterior_mean_coef1", t, x_t) * x0 + tables.at("posterior_mean_coef2", t, x_t) * x_t
    var = tables.at("posterior_variance", t, x_t).expand_as(x_t)
    log_var = tables.at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
    return mean, var, log_var


def predict_x0_from_eps(
    tables: DiffusionTables, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """``x0 = sqrt(1 / ab_t) x_t - sqrt(1 / ab_t - 1) eps``."""
    return (
        tables.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        - tables.at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
    )


def predict_eps_from_x0(
    tables: DiffusionTables, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """``eps = (sqrt(1 / ab_t) x_t - x0) / sqrt(1 / ab_t - 1)`` (the inverse of ``predict_x0_from_eps``)."""
    return (tables.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / tables.at(
        "sqrt_recipm1_alphas_cumprod", t, x_t
    )


def learned_range_log_variance(tables: DiffusionTables, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Improved DDPM eq. 15: ``log Sigma = f log beta_t + (1 - f) log beta~_t`` with ``f = (v + 1) / 2``
    (``v`` in [-1, 1] is the model's variance output; beta~_t's log clipped at t = 0)."""
    frac = (v + 1) / 2
    return frac * tables.at("log_betas", t, v) + (1 - frac) * tables.at(
        "posterior_log_variance_clipped", t, v
    )


def p_mean_variance(
    tables: DiffusionTables,
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    clip_denoised: bool = False,
) -> dict[str, torch.Tensor]:
    """``p(x_{t-1} | x_t)`` from the model output ``(B, 2C, ...) = (eps, v)``: ``mean`` (the posterior mean at
    the predicted x0), ``log_variance`` (learned range) and ``pred_x0`` (clamped to [-1, 1] if asked)."""
    eps, v = model_out.chunk(2, dim=1)  # (B, C, ...) each
    log_var = learned_range_log_variance(tables, v, t)
    x0 = predict_x0_from_eps(tables, x_t, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean, _, _ = q_posterior_mean_variance(tables, x0, x_t, t)
    return {"mean": mean, "log_variance": log_var, "pred_x0": x0, "eps": eps}


# --------------------------------------------------------------------------------------------------------
# likelihood terms


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """``KL(N(m1, e^l1) || N(m2, e^l2)) = 0.5 (-1 + l2 - l1 + e^(l1 - l2) + (m1 - m2)^2 e^-l2)`` elementwise, nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF: ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) of 8-bit data in [-1, 1] under a Gaussian discretized to bins of width 2/255 (DDPM sec. 3.3):
    ``log(CDF(x + 1/255) - CDF(x - 1/255))``, with the outermost bins extended to -inf (x < -0.999) and +inf
    (x > 0.999); every log clamped at 1e-12. Nats, elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def vb_terms_bits(
    tables: DiffusionTables,
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The VB term per sample, in bits per dimension: ``KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / ln 2`` for
    t > 0 and the decoder NLL ``-log p(x0 | x_1) / ln 2`` at t = 0 (improved DDPM; unclipped x0)."""
    true_mean, _, true_log_var = q_posterior_mean_variance(tables, x0, x_t, t)
    p = p_mean_variance(tables, model_out, x_t, t, clip_denoised=False)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    nll = _mean_flat(nll) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


def hybrid_loss(
    tables: DiffusionTables,
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Improved DDPM eq. 16 per sample: ``mse = mean((eps - eps_theta)^2)`` plus the VB term computed with the
    mean output detached (``L_vb`` trains only the variance). Returns ``{"mse", "vb", "loss"}``, each (B,)."""
    eps, v = model_out.chunk(2, dim=1)
    frozen = torch.cat([eps.detach(), v], dim=1)  # the VB term must not move the mean prediction
    vb = vb_terms_bits(tables, frozen, x0, x_t, t)
    mse = _mean_flat((noise - eps) ** 2)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def ddim_step(
    tables: DiffusionTables,
    x_t: torch.Tensor,
    t: torch.Tensor,
    pred_x0: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM eq. 12: ``x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``; eps re-derived from x0; no noise
    at t = 0."""
    eps = predict_eps_from_x0(tables, x_t, t, pred_x0)
    ab = tables.at("alphas_cumprod", t, x_t)
    ab_prev = tables.at("alphas_cumprod_prev", t, x_t)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = pred_x0 * ab_prev.sqrt() + torch.sqrt(1 - ab_prev - sigma**2) * eps
    if noise is None or eta == 0:
        return mean
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * sigma * noise


# --------------------------------------------------------------------------------------------------------
# the training objective


class ImprovedDDPM:
    """DiT's training objective: t ~ U{0..N-1}, eps-prediction with learned-range variance, hybrid loss.

    ``draw`` gives ``TrainingInputs`` with ``t`` as float timesteps (B,) for the denoiser; ``loss`` takes the
    denoiser's ``(B, 2C, ...)`` output and returns the batch mean of ``mse + vb`` (in fp32, whatever the
    autocast dtype of the prediction).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.tables = DiffusionTables(linear_betas(num_timesteps, beta_start, beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.tables.num_timesteps

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator)  # (B,) on the generator's device
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        t = t.to(x0.device)
        x_t = q_sample(self.tables, x0, t, noise)
        return TrainingInputs(x0=x0, noise=noise, x_t=x_t, t=t.float(), target=noise, extras={"t_index": t})

    def loss(self, pred: Any, inputs: TrainingInputs) -> torch.Tensor:
        out = pred.float()
        c = inputs.x0.shape[1]
        if out.shape[1] != 2 * c:
            raise FrameloomError(
                f"the learned-variance objective needs 2 x {c} output channels (eps, variance), got {out.shape[1]}"
            )
        terms = hybrid_loss(
            self.tables,
            out,
            inputs.x0.float(),
            inputs.x_t.float(),
            inputs.extras["t_index"],
            inputs.noise.float(),
        )
        return terms["loss"].mean()
