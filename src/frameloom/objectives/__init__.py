"""Training objectives as small pure functions (flow matching; ddpm and pyramid flow live beside it)."""

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
