"""Training objectives as small pure functions (flow matching; ddpm and pyramid flow live beside it)."""

from frameloom.config.schema import Config, ObjectiveConfig

from .base import (
    Conditioning,
    Objective,
    StepContext,
    TrainingInputs,
    call_denoiser,
    predict,
    with_clip_frame_rates,
)
from .ddpm import (
    DDPMObjective,
    DDPMSchedule,
    VPredictionDDPM,
    cogvideox_x0_loss,
    ddpm_objective,
    rescale_zero_terminal_snr,
    snr_shift,
    v_target,
    x0_from_v,
)
from .flow import (
    OPENSORA_SIGMA_MIN,
    FlowMatching,
    caption_dropout_mask,
    flow_interpolate,
    flow_loss,
    flow_target,
    opensora_interpolate,
    opensora_shift,
    opensora_target,
    sample_logit_normal,
    sample_uniform,
    shift_timesteps,
)

__all__ = [
    "Conditioning",
    "Objective",
    "StepContext",
    "TrainingInputs",
    "call_denoiser",
    "with_clip_frame_rates",
    "predict",
    "build_objective",
    "flow_settings",
    "DDPMObjective",
    "DDPMSchedule",
    "VPredictionDDPM",
    "ddpm_objective",
    "cogvideox_x0_loss",
    "rescale_zero_terminal_snr",
    "snr_shift",
    "v_target",
    "x0_from_v",
    "OPENSORA_SIGMA_MIN",
    "FlowMatching",
    "caption_dropout_mask",
    "flow_interpolate",
    "flow_loss",
    "flow_target",
    "opensora_interpolate",
    "opensora_shift",
    "opensora_target",
    "sample_logit_normal",
    "sample_uniform",
    "shift_timesteps",
]


def flow_settings(
    o: ObjectiveConfig,
    default_shift: float | str = 1.0,
    default_sampling: str = "logit_normal",
    auto_shift: float | str = "auto",
) -> dict:
    """``FlowMatching`` keyword arguments from ``objective.*``: a null ``objective.shift`` /
    ``objective.timestep_sampling`` takes the family's ``default_shift`` (1.0 = none, frameloom's own DiT) /
    ``default_sampling``; ``shift: auto`` the family's resolution-dependent ``auto_shift`` ("auto": Open-Sora
    2.0's rule for the DiT)."""
    if o.shift is None:
        shift = default_shift
    elif o.shift == "auto":
        shift = auto_shift
    else:
        shift = (
            o.shift if isinstance(o.shift, str) else float(o.shift)
        )  # another string: FlowMatching says no
    return dict(
        timestep_sampling=o.timestep_sampling or default_sampling,
        logit_mean=o.logit_mean,
        logit_std=o.logit_std,
        shift=shift,
        min_t=o.min_t,
        max_t=o.max_t,
        loss_weighting=o.loss_weighting,
    )


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``objective.name``; a family may supply its own (``Family.build_objective``)."""
    from frameloom.errors import FrameloomError
    from frameloom.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.build_objective is not None:
        return family.build_objective(cfg)
    o = cfg.objective
    if o.name in (None, "flow"):  # null: the family's own, flow matching for frameloom's DiT
        try:
            return FlowMatching(**flow_settings(o))
        except ValueError as exc:
            raise FrameloomError(f"objective: {exc}") from None
    if o.name == "ddpm":
        return ddpm_objective_from_config(cfg)
    raise FrameloomError(f"objective.name {o.name!r} is not available for model.family {cfg.model.family!r}")


def ddpm_objective_from_config(cfg: Config) -> DDPMObjective:
    """``objective.name: ddpm``: diffusers ``DDPMScheduler``'s default betas with ``objective.prediction_type``,
    ``rescale_betas_zero_snr``, ``snr_gamma`` and ``timestep_sampling`` (``uniform`` / ``explicit_uniform``)."""
    o = cfg.objective
    return ddpm_objective(
        prediction_type=o.prediction_type,
        rescale_betas_zero_snr=o.rescale_betas_zero_snr,
        snr_gamma=o.snr_gamma,
        timestep_sampling=o.timestep_sampling or "uniform",  # null: uniform integer timesteps
        grad_accum=cfg.train.grad_accum,
    )
