"""Timestep control of the family objectives: sigmoid and shift sampling, the [min_t, max_t] range and the SD3
loss weightings by hand; each family's defaults (null config keys) and what a family refuses."""

from __future__ import annotations

import math

import pytest
import torch

from families import build_tiny_cogvideox, build_tiny_ltx, family_config
from frameloom.config import load_config
from frameloom.errors import FrameloomError
from frameloom.objectives import build_objective
from frameloom.objectives.base import TrainingInputs
from frameloom.objectives.flow import FlowMatching, flow_loss_weight, map_to_range


def test_sigmoid_and_shift_sampling_by_hand():
    """musubi-tuner's `sigmoid` is sigmoid(scale * N(0, 1)) and never shifted; `shift` is the same draw,
    shifted; `logit_normal` adds the mean."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, generator=g)
    s = torch.sigmoid(2.0 * u)
    for sampling, expected in (
        ("sigmoid", s),
        ("shift", 3 * s / (1 + 2 * s)),
        ("logit_normal", (lambda x: 3 * x / (1 + 2 * x))(torch.sigmoid(2.0 * u + 0.5))),
    ):
        flow = FlowMatching(timestep_sampling=sampling, logit_mean=0.5, logit_std=2.0, shift=3.0)
        torch.testing.assert_close(flow.sample_t(4, torch.Generator().manual_seed(0)), expected)


def test_time_range_by_hand():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert map_to_range(t, 0.2, 0.6).tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert map_to_range(t) is t
    # applied after the shift, as musubi-tuner does: 0.2 + 0.4 * shift(U)
    flow = FlowMatching(timestep_sampling="uniform", shift=3.0, min_t=0.2, max_t=0.6)
    u = torch.rand(5, generator=torch.Generator().manual_seed(1))
    expected = 0.2 + 0.4 * (3 * u / (1 + 2 * u))
    torch.testing.assert_close(flow.sample_t(5, torch.Generator().manual_seed(1)), expected)
    with pytest.raises(ValueError, match="min_t < max_t"):
        FlowMatching(min_t=0.5, max_t=0.5)


def test_loss_weightings_by_hand():
    t = torch.tensor([0.5, 0.25])
    assert flow_loss_weight(t, "none") is None
    assert flow_loss_weight(t, "sigma_sqrt").tolist() == [4.0, 16.0]  # t^-2
    # cosmap 2 / (pi (1 - 2t + 2t^2)): t = 0.5 -> 2 / (pi * 0.5); t = 0.25 -> 2 / (pi * 0.625)
    assert flow_loss_weight(t, "cosmap").tolist() == pytest.approx([4 / math.pi, 3.2 / math.pi])
    # the loss: per-sample means (1 and 4), weighted 4 and 16, then the batch mean: (4 + 64) / 2
    pred, target = torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.zeros(2, 2)
    inputs = TrainingInputs(x0=target, noise=target, x_t=target, t=t, target=target)
    assert FlowMatching(loss_weighting="sigma_sqrt").loss(pred, inputs).item() == 34.0
    assert FlowMatching().loss(pred, inputs).item() == 2.5


def test_family_defaults_and_refusals(tmp_path):
    cog = build_tiny_cogvideox(tmp_path / "cog")
    ltx = build_tiny_ltx(tmp_path / "ltx")

    def cfg(family, pre, *extra):
        return load_config(None, family_config(family, pre, tmp_path / "m.csv", tmp_path / "run", *extra))

    # frameloom's DiT: flow, logit-normal, unshifted
    dit = build_objective(load_config(None, ["objective.min_t=0.1"]))
    assert (dit.timestep_sampling, dit.shift, dit.min_t) == ("logit_normal", 1.0, 0.1)
    # LTX-Video: logit-normal with the resolution shift e^mu; a set shift (also 1.0) replaces it
    assert build_objective(cfg("ltx_video", ltx)).flow.shift == "auto"
    assert build_objective(cfg("ltx_video", ltx, "objective.shift=auto")).flow.shift == "auto"
    assert build_objective(cfg("ltx_video", ltx, "objective.shift=1.0")).flow.shift == 1.0
    weighted = build_objective(cfg("ltx_video", ltx, "objective.loss_weighting=cosmap"))
    assert weighted.flow.loss_weighting == "cosmap"
    assert build_objective(load_config(None, ["objective.shift=auto"])).shift == "auto"  # Open-Sora's rule
    with pytest.raises(FrameloomError, match="shift must be a positive number or 'auto'"):
        build_objective(load_config(None, ["objective.shift=fast"]))
    # CogVideoX: DDPM only. objective.name=flow used to be accepted and silently ignored.
    with pytest.raises(FrameloomError, match="objective.name=ddpm"):
        build_objective(cfg("cogvideox", cog, "objective.name=flow"))
    for key in (
        "objective.shift=3.0",
        "objective.loss_weighting=cosmap",
        "objective.timestep_sampling=shift",
    ):
        with pytest.raises(FrameloomError, match="only objective.min_t/max_t"):
            build_objective(cfg("cogvideox", cog, key))
    assert build_objective(cfg("cogvideox", cog, "objective.name=ddpm")).t_low == 0
    # its integer timesteps restricted to [500, 600) of 1000
    ranged = build_objective(cfg("cogvideox", cog, "objective.min_t=0.5", "objective.max_t=0.6"))
    t = ranged.draw(torch.zeros(64, 4, 1, 2, 2), torch.Generator().manual_seed(0)).t
    assert int(t.min()) >= 500 and int(t.max()) < 600 and len(set(t.tolist())) > 20
    with pytest.raises(FrameloomError, match="objective.name=flow"):
        build_objective(cfg("ltx_video", ltx, "objective.name=ddpm"))  # a flow family refuses ddpm too
