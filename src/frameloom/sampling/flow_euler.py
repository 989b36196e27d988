"""Euler sampler for flow-matching models, with classifier-free guidance.

Integrates the probability-flow ODE ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data) with
explicit Euler steps ``x_next = x + (t_next - t) * v`` (rectified flow, Liu et al. 2022; SD3's and diffusers'
``FlowMatchEulerDiscreteScheduler`` use the same update), where ``v`` is the model's prediction of
``noise - x0``. Classifier-free guidance (Ho & Salimans, 2022) combines ``v = v_u + g (v_c - v_u)``.

Everything here is deterministic: the randomness is the ``noise`` the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from frameloom.objectives.flow import shift_timesteps

__all__ = ["Cond", "ModelFn", "euler_sample", "flow_timesteps"]

#: Text conditioning: ``(embeddings (B, L, D), mask (B, L) bool or None)``, or the embeddings alone.
Cond = tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor


class ModelFn(Protocol):
    """``model_fn(x (B, ...), t (B,) float in [0, 1], text (B, L, D), text_mask (B, L) | None) -> v``."""

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor: ...


def flow_timesteps(
    num_steps: int, shift: float = 1.0, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``num_steps + 1`` times from 1 to 0: ``shift_timesteps(1 - i / num_steps, shift)``, float32.

    Uniform in ``t`` before the shift (SD3 / diffusers flow-match Euler); ``shift > 1`` spends more steps
    near the noise end. Example: ``flow_timesteps(4, 3.0)`` = ``[1, 0.9, 0.75, 0.5, 0]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).to(device=device, dtype=torch.float32)


def _split(cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(cond, torch.Tensor):
        return cond, None
    text, mask = cond
    return text, mask


def _pad_to(text: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(B, L, D)`` embeddings with zero tokens (mask False) to ``length``; always returns a mask."""
    B, L, _ = text.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
    if L < length:
        text = torch.nn.functional.pad(text, (0, 0, 0, length - L))
        mask = torch.nn.functional.pad(mask.bool(), (0, length - L), value=False)
    return text, mask.bool()


def _batch_cfg(cond: Cond, uncond: Cond, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack ``[uncond; cond]`` text along the batch (``2B``), padding to a common length if needed."""
    c_text, c_mask = _split(cond)
    u_text, u_mask = _split(uncond)
    if u_text.shape[0] == 1 and batch > 1:  # one negative prompt for the whole batch
        u_text = u_text.expand(batch, *u_text.shape[1:])
        u_mask = None if u_mask is None else u_mask.expand(batch, -1)
    if c_mask is None and u_mask is None and c_text.shape[1] == u_text.shape[1]:
        return torch.cat([u_text, c_text.to(u_text)]), None
    length = max(c_text.shape[1], u_text.shape[1])
    u_text, u_mask = _pad_to(u_text, u_mask, length)
    c_text, c_mask = _pad_to(c_text, c_mask, length)
    return torch.cat([u_text, c_text.to(u_text)]), torch.cat([u_mask, c_mask])


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn | Callable[..., torch.Tensor],
    noise: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float = 1.0,
    shift: float = 1.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate ``x0`` from ``noise`` (``x`` at ``t = 1``) by Euler integration of the flow to ``t = 0``.

    Args:
        model_fn: ``model_fn(x, t, text, text_mask) -> v`` (shaped like ``x``), predicting ``noise - x0``.
        noise: the starting point ``(B, ...)``; the only source of randomness (seed it to reproduce).
        steps: number of steps (the grid is :func:`flow_timesteps` ``(steps, shift)``), or an explicit
            descending 1-D tensor of times from ~1 to ~0 (then ``shift`` is ignored).
        cond: conditional text ``(embeddings (B, L, D), mask (B, L) | None)`` or the embeddings alone.
        uncond: unconditional / negative-prompt text, same forms (batch ``B`` or 1; any length: padded).
            Required when ``guidance != 1``.
        guidance: classifier-free guidance scale ``g``: ``v = v_u + g (v_c - v_u)``, evaluated as a single
            forward of batch ``2B`` per step. ``g = 1`` runs only the conditional branch.
        shift: timestep shift of the grid (see :func:`frameloom.objectives.flow.shift_timesteps`).
        callback: optional ``callback(step_index, x)`` after every step.

    Returns:
        ``x`` at the last time of the grid (``t = 0``): same shape and dtype as ``noise``.
    """
    ts = flow_timesteps(steps, shift, device=noise.device) if isinstance(steps, int) else steps
    ts = torch.as_tensor(ts, dtype=torch.float32, device=noise.device)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError("timesteps must be a 1-D tensor with at least 2 entries (from 1 toward 0)")
    use_cfg = guidance != 1.0
    if use_cfg and uncond is None:
        raise ValueError(f"guidance={guidance} needs uncond (the empty or negative prompt embeddings)")

    B = noise.shape[0]
    if use_cfg:
        text, text_mask = _batch_cfg(cond, uncond, B)
    else:
        text, text_mask = _split(cond)

    x = noise
    times = ts.tolist()
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        if use_cfg:
            t_in = torch.full((2 * B,), t, device=noise.device)
            v_u, v_c = model_fn(torch.cat([x, x]), t_in, text, text_mask).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model_fn(x, torch.full((B,), t, device=noise.device), text, text_mask)
        x = x + (t_next - t) * v.to(x.dtype)
        if callback is not None:
            callback(i, x)
    return x
