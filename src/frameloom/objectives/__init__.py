"""Training objectives as small pure functions (flow matching; ddpm and pyramid flow live beside it)."""

from frameloom.config.schema import Config

from .base import Conditioning, Objective, StepContext, TrainingInputs, call_denoiser, predict
from .ddpm import (
    DDPMSchedule,
    VPredictionDDPM,
    cogvideox_x0_loss,
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
    "predict",
    "build_objective",
    "DDPMSchedule",
    "VPredictionDDPM",
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


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``objective.name``; a family may supply its own (``Family.build_objective``)."""
    from frameloom.errors import FrameloomError
    from frameloom.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.build_objective is not None:
        return family.build_objective(cfg)
    o = cfg.objective
    if o.name == "flow":
        try:
            return FlowMatching(
                timestep_sampling=o.timestep_sampling,
                logit_mean=o.logit_mean,
                logit_std=o.logit_std,
                shift=o.shift,
            )
        except ValueError as exc:
            raise FrameloomError(f"objective: {exc}") from None
    raise FrameloomError(f"objective.name {o.name!r} is not available for model.family {cfg.model.family!r}")
