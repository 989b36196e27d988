"""Flow-matching time grids and shifts of the diffusers schedulers Wan and LTX-Video ship, as pure functions.

frameloom's own sampler (``frameloom.sampling.flow_euler.euler_sample``) integrates on an explicit grid of
times; for a pretrained family that grid must be the one its pipeline uses, or "frameloom's sample" and "the
pipeline's sample" would differ by more than rounding. The grid is what diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps`` computes (read from diffusers 0.42, re-derived here):

1. Training grid: ``N = num_train_timesteps`` (1000) times ``t_i = i / N``, ``i = N..1``; without dynamic
   shifting they are shifted once (``static_shift``), so ``sigma_min = shift(1 / N)``, ``sigma_max = 1``.
2. Inference grid for ``n`` steps: ``linspace(sigma_max, sigma_min, n)`` (through ``N * sigma``, in float64),
   shifted again: ``static_shift`` with the config's ``shift``, or with dynamic shifting the exponential time
   shift ``e^mu / (e^mu + 1/t - 1)`` (the same map with ``shift = e^mu``); LTX-Video's pipeline passes its own
   ``linspace(1, 1/n, n)`` instead (float32).
3. ``shift_terminal``: stretch so the last sigma equals it, ``1 - (1 - t) * (1 - terminal) / (1 - t_last)``.
4. Append ``0``. The model is called with ``timestep = 1000 * sigma``; each step is ``x += (s_next - s) v``.

Wan ships a ``UniPCMultistepScheduler`` (``flow_shift``, ``use_flow_sigmas``): a multistep solver with its own
grid. frameloom samples it with Euler on the grid above with ``shift = flow_shift`` (what
``FlowMatchEulerDiscreteScheduler.from_config(unipc_config, shift=flow_shift)`` does); the pipeline with
UniPC then differs from frameloom's sample by the solver, not the model.

LTX-Video's resolution-dependent shift (``calculate_shift`` in diffusers' LTX pipeline): ``mu`` is linear in
the latent token count between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frameloom.errors import FrameloomError

__all__ = [
    "exponential_time_shift",
    "flow_match_sigmas",
    "load_scheduler_config",
    "resolution_mu",
    "scheduler_shift",
    "static_shift",
    "stretch_to_terminal",
]

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def static_shift(sigma, shift: float):
    """SD3's shift ``s * t / (1 + (s - 1) * t)`` (diffusers ``FlowMatchEulerDiscreteScheduler``, ``shift``)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def exponential_time_shift(mu: float, sigma):
    """Flux/LTX's dynamic shift ``e^mu / (e^mu + (1 / t - 1))``, i.e. ``static_shift`` with ``s = e^mu``."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def stretch_to_terminal(sigmas, terminal: float):
    """Stretch a decreasing grid so its last value is ``terminal`` (LTX-Video's ``shift_terminal``):
    ``1 - (1 - t) / c`` with ``c = (1 - t_last) / (1 - terminal)``."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - terminal)
    return 1 - one_minus / scale


def resolution_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The log-shift ``mu`` for ``seq_len`` latent tokens: the line through ``(base_seq_len, base_shift)`` and
    ``(max_seq_len, max_shift)`` (diffusers' ``calculate_shift``; LTX-Video's config: 1024 -> 0.95,
    4096 -> 2.05). Extrapolated, not clamped, outside that range, as the pipeline does."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def load_scheduler_config(root: str | os.PathLike) -> dict[str, Any]:
    """``<root>/scheduler/scheduler_config.json`` as a dict (a clear error when missing)."""
    path = Path(root) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read the scheduler config {path}: {exc}") from None


def scheduler_shift(config: dict[str, Any]) -> float:
    """The static shift of a flow-matching scheduler config: ``shift`` (FlowMatchEuler) or ``flow_shift``
    (UniPC / DPM-Solver with ``use_flow_sigmas``, what Wan 2.1 ships: 3.0 for 480p, 5.0 for 720p)."""
    if config.get("use_flow_sigmas") and config.get("flow_shift") is not None:
        return float(config["flow_shift"])
    return float(config.get("shift", 1.0) or 1.0)


def flow_match_sigmas(
    num_steps: int,
    config: dict[str, Any],
    *,
    mu: float | None = None,
    sigmas: np.ndarray | list[float] | None = None,
) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float32, from ~1 down to 0) a pipeline integrates on (module docstring).

    ``config`` is the scheduler config (``shift``/``flow_shift``, ``use_dynamic_shifting``,
    ``shift_terminal``, ``num_train_timesteps``); ``mu`` is required with dynamic shifting; ``sigmas``
    replaces step 2's linspace (LTX-Video's pipeline passes ``linspace(1, 1/n, n)``). The arithmetic follows
    the scheduler's dtypes (float64 for its own linspace, float32 for passed sigmas) so the grids agree to the
    last bit.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise FrameloomError(f"scheduler config: {key}=true is not supported by frameloom's flow sampler")
    if config.get("time_shift_type", "exponential") != "exponential":
        raise FrameloomError("scheduler config: only time_shift_type 'exponential' is supported")
    n_train = int(config.get("num_train_timesteps", 1000))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    shift = scheduler_shift(config)
    if dynamic and mu is None:
        raise ValueError("this scheduler uses dynamic shifting: pass mu (see resolution_mu)")

    if sigmas is None:
        # 1. The training grid's ends, in float32 as the scheduler's __init__ computes them.
        train = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()) / n_train
        if not dynamic:
            train = static_shift(train, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        # 2. The inference grid (float64 through timesteps, as set_timesteps does).
        grid = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        grid = np.asarray(sigmas).astype(np.float32)
        if grid.shape != (num_steps,):
            raise ValueError(f"sigmas must have {num_steps} entries, got {grid.shape}")
    grid = exponential_time_shift(mu, grid) if dynamic else static_shift(grid, shift)
    # 3. Stretch to the terminal sigma, then 4. append 0.
    terminal = config.get("shift_terminal")
    if terminal:
        grid = stretch_to_terminal(grid, float(terminal))
    out = torch.from_numpy(np.asarray(grid)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])
