"""Flow matching (rectified flow) training objective: small pure functions plus a config that ties them.

Time convention (used everywhere in frameloom's flow code, and by SD3 / diffusers' flow-match schedulers):
``t = 0`` is data, ``t = 1`` is pure noise. The model predicts the velocity ``dx_t / dt``, which for the
straight path is ``noise - x0``; samplers integrate from ``t = 1`` down to ``t = 0``.

Sources:
    * Rectified flow: Liu, Gong & Liu, "Flow Straight and Fast", 2022; Lipman et al., "Flow Matching for
      Generative Modeling", 2022 (the ``sigma_min`` variant).
    * SD3: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", 2024
      (logit-normal timestep sampling, resolution-dependent timestep shift).
    * Open-Sora 2.0 (hpcaitech/Open-Sora, as recorded in SEED_FACTS.md): logit-normal(0, 1) times shifted by
      ``(1 + (S - 256) * 2 / 3840) * sqrt(T_lat)``, ``sigma_min = 1e-5``.
    * musubi-tuner (kohya-ss/musubi-tuner, ``training/trainer_base.py``): ``sigmoid`` / ``shift`` timestep
      sampling and the ``[min_timestep, max_timestep]`` range applied after drawing and shifting.
    * SD3 loss weightings ``sigma_sqrt`` / ``cosmap`` (diffusers' ``compute_loss_weighting_for_sd3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from frameloom.objectives.base import StepContext, TrainingInputs

__all__ = [
    "OPENSORA_SIGMA_MIN",
    "FlowMatching",
    "caption_dropout_mask",
    "flow_interpolate",
    "flow_loss",
    "flow_loss_weight",
    "map_to_range",
    "flow_target",
    "opensora_interpolate",
    "opensora_shift",
    "opensora_target",
    "sample_logit_normal",
    "sample_uniform",
    "shift_timesteps",
]

#: Open-Sora 2.0's residual noise at the data end of the path.
OPENSORA_SIGMA_MIN = 1e-5


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample time ``(B,)`` (or scalar) against ``like`` ``(B, ...)``, in ``like``'s dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------------------------
# paths and targets


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow point ``x_t = (1 - t) x0 + t noise`` (Liu et al. 2022; SD3 eq. 3 with a_t = 1 - t).

    ``t`` is ``(B,)`` (broadcast over the other dims of ``x0``) or a scalar.
    """
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity target ``dx_t/dt = noise - x0`` (Liu et al. 2022)."""
    return noise - x0


def opensora_interpolate(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float, s_min: float = OPENSORA_SIGMA_MIN
) -> torch.Tensor:
    """Open-Sora 2.0 point ``x_t = (1 - t) x0 + (1 - (1 - s_min)(1 - t)) noise`` (Lipman et al.'s OT path).

    Same convention as :func:`flow_interpolate`: ``t = 1`` gives pure noise and ``t = 0`` gives
    ``x0 + s_min * noise`` (data plus a residual ``s_min`` of noise). Open-Sora's own code runs its time
    variable the other way round; SEED_FACTS.md records the formula already in this convention, so the shifted
    logit-normal times of :func:`opensora_shift` apply unchanged (a shift > 1 moves samples toward noise).
    With ``s_min = 0`` this is exactly :func:`flow_interpolate`.
    """
    t = _bcast(t, x0)
    return (1 - t) * x0 + (1 - (1 - s_min) * (1 - t)) * noise


def opensora_target(x0: torch.Tensor, noise: torch.Tensor, s_min: float = OPENSORA_SIGMA_MIN) -> torch.Tensor:
    """Open-Sora 2.0 velocity target ``dx_t/dt = (1 - s_min) noise - x0`` for :func:`opensora_interpolate`."""
    return (1 - s_min) * noise - x0


# --------------------------------------------------------------------------------------------------------
# timestep sampling


def _device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str:
    if device is not None:
        return device
    return generator.device if generator is not None else "cpu"


def sample_uniform(
    n: int, generator: torch.Generator | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """``n`` flow times ``t ~ U[0, 1)`` (rectified flow), float32 ``(n,)``."""
    return torch.rand(n, generator=generator, device=_device(generator, device))


def sample_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` flow times ``t = sigmoid(u)``, ``u ~ N(mean, std)`` (SD3 sec. 3.1; Open-Sora 2.0: N(0, 1)).

    The median of ``t`` is ``sigmoid(mean)``; larger ``std`` puts more mass near 0 and 1.
    """
    u = torch.randn(n, generator=generator, device=_device(generator, device))
    return torch.sigmoid(u * std + mean)


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Resolution shift ``t' = s t / (1 + (s - 1) t)`` (SD3 eq. 23; Open-Sora 2.0; Flux/diffusers "shift").

    Maps 0 -> 0 and 1 -> 1; ``s > 1`` moves times toward noise (``t = 1``), which larger inputs need because
    their signal survives more noise. ``s = 1`` is the identity.
    """
    return shift * t / (1 + (shift - 1) * t)


def opensora_shift(latent_tokens_per_frame: int, latent_frames: int) -> float:
    """Open-Sora 2.0's timestep shift ``(1 + (S - 256) * 2 / 3840) * sqrt(T_lat)``.

    Args:
        latent_tokens_per_frame: ``S``, latent tokens per frame after 2x2 patching (``H_lat * W_lat // 4``).
        latent_frames: ``T_lat``, number of latent frames.

    The factor is linear in ``S`` from 1 at 256 tokens (256px images) to 3 at 4096 tokens, times
    ``sqrt(T_lat)`` for video length. Source: SEED_FACTS.md (read from Open-Sora 2.0's training code).
    """
    return (1 + (latent_tokens_per_frame - 256) * 2 / 3840) * math.sqrt(latent_frames)


def map_to_range(t: torch.Tensor, min_t: float = 0.0, max_t: float = 1.0) -> torch.Tensor:
    """``t' = min_t + (max_t - min_t) t``: training times restricted to ``[min_t, max_t]`` after drawing and
    shifting (musubi-tuner's ``--min_timestep/--max_timestep``, divided by 1000)."""
    if min_t == 0.0 and max_t == 1.0:
        return t
    return t * (max_t - min_t) + min_t


def flow_loss_weight(t: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """Per-sample loss weight for flow time (= sigma) ``t`` ``(B,)`` (SD3, diffusers'
    ``compute_loss_weighting_for_sd3``): ``none`` -> None, ``sigma_sqrt`` -> ``t^-2``,
    ``cosmap`` -> ``2 / (pi (1 - 2t + 2t^2))``."""
    if scheme == "none":
        return None
    if scheme == "sigma_sqrt":
        return t.float() ** -2.0
    if scheme == "cosmap":
        t = t.float()
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"loss_weighting must be none, sigma_sqrt or cosmap, got {scheme!r}")


def caption_dropout_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool ``(n,)``: True where the caption is replaced by the empty prompt (classifier-free guidance
    training, Ho & Salimans 2022; p = 0.1 in Pyramid Flow, sqrt(0.1) per text encoder in Open-Sora 2.0)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device) < p


# --------------------------------------------------------------------------------------------------------
# loss


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error: the mean over each sample's elements, then the (weighted) mean over the batch.

    ``weight`` (``(B,)``) multiplies the per-sample losses before the batch mean (``mean(w_i * l_i)``).
    Computed in float32. This is the plain flow-matching loss of rectified flow / SD3 / Open-Sora 2.0.
    """
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


# --------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FlowMatching:
    """A flow-matching objective: how training times are drawn and what the model regresses.

    Attributes:
        timestep_sampling: ``"uniform"``, ``"logit_normal"``, ``"sigmoid"`` (``sigmoid(logit_std * N(0, 1))``,
            never shifted) or ``"shift"`` (the same draw, shifted); musubi-tuner's names for the last two.
        logit_mean, logit_std: parameters of the logit-normal sampler (``logit_std`` is the scale of
            ``sigmoid`` and ``shift``, musubi-tuner's ``sigmoid_scale``).
        shift: timestep shift applied after sampling: a float (1.0 = none) or ``"auto"`` for Open-Sora 2.0's
            :func:`opensora_shift` computed from the latent size passed to :meth:`sample_t`.
        s_min: residual noise at the data end (0 = plain rectified flow; Open-Sora 2.0 uses 1e-5).
        min_t, max_t: the drawn (and shifted) times are mapped into ``[min_t, max_t]`` (:func:`map_to_range`).
        loss_weighting: ``"none"``, ``"sigma_sqrt"`` or ``"cosmap"`` (:func:`flow_loss_weight`).

    ``FlowMatching.opensora()`` gives Open-Sora 2.0's settings.
    """

    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid", "shift"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | Literal["auto"] = 1.0
    s_min: float = 0.0
    min_t: float = 0.0
    max_t: float = 1.0
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.timestep_sampling not in ("uniform", "logit_normal", "sigmoid", "shift"):
            raise ValueError(
                "timestep_sampling must be uniform, logit_normal, sigmoid or shift, "
                f"got {self.timestep_sampling!r}"
            )
        if not 0.0 <= self.min_t < self.max_t <= 1.0:
            raise ValueError(f"need 0 <= min_t < max_t <= 1, got min_t={self.min_t}, max_t={self.max_t}")
        if self.loss_weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(
                f"loss_weighting must be none, sigma_sqrt or cosmap, got {self.loss_weighting!r}"
            )
        if self.shift != "auto" and not (isinstance(self.shift, (int, float)) and self.shift > 0):
            raise ValueError(f"shift must be a positive number or 'auto', got {self.shift!r}")
        if not 0.0 <= self.s_min < 1.0:
            raise ValueError(f"s_min must be in [0, 1), got {self.s_min}")

    @classmethod
    def opensora(cls) -> FlowMatching:
        """Open-Sora 2.0: logit-normal(0, 1), automatic shift, ``s_min = 1e-5``."""
        return cls(
            timestep_sampling="logit_normal",
            logit_mean=0.0,
            logit_std=1.0,
            shift="auto",
            s_min=OPENSORA_SIGMA_MIN,
        )

    def resolve_shift(self, latent_size: tuple[int, int, int] | None = None) -> float:
        """The numeric shift; ``"auto"`` uses ``latent_size = (T_lat, H_lat, W_lat)`` (before patching)."""
        if self.shift != "auto":
            return float(self.shift)
        if latent_size is None:
            raise ValueError("shift='auto' needs latent_size=(T_lat, H_lat, W_lat)")
        t_lat, h_lat, w_lat = latent_size
        return opensora_shift(h_lat * w_lat // 4, t_lat)

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        latent_size: tuple[int, int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``batch`` training times ``(batch,)`` in [0, 1], apply the configured shift (not for
        ``sigmoid``), then map them into ``[min_t, max_t]``."""
        if self.timestep_sampling == "uniform":
            t = sample_uniform(batch, generator, device=device)
        elif self.timestep_sampling == "logit_normal":
            t = sample_logit_normal(batch, self.logit_mean, self.logit_std, generator, device=device)
        else:  # musubi-tuner's sigmoid / shift: sigmoid(scale * N(0, 1))
            t = sample_logit_normal(batch, 0.0, self.logit_std, generator, device=device)
        shift = 1.0 if self.timestep_sampling == "sigmoid" else self.resolve_shift(latent_size)
        t = t if shift == 1.0 else shift_timesteps(t, shift)
        return map_to_range(t, self.min_t, self.max_t)

    def training_pair(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` for clean latents ``x0``, Gaussian ``noise`` and times ``t`` ``(B,)``."""
        if self.s_min == 0.0:
            return flow_interpolate(x0, noise, t), flow_target(x0, noise)
        return opensora_interpolate(x0, noise, t, self.s_min), opensora_target(x0, noise, self.s_min)

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        """Times (drawn first) and noise (second) from ``generator``, then moved to ``x0``'s device.

        ``shift="auto"`` takes the latent size from ``x0`` ``(B, C, T_lat, H_lat, W_lat)``.
        """
        t = self.sample_t(x0.shape[0], generator, latent_size=tuple(x0.shape[2:]))  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        x_t, target = self.training_pair(x0, noise, t)
        return TrainingInputs(x0=x0, noise=noise, x_t=x_t, t=t, target=target)

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        """MSE to the velocity target (:func:`flow_loss`), weighted per sample by ``loss_weighting``."""
        return flow_loss(pred, inputs.target, flow_loss_weight(inputs.t, self.loss_weighting))
