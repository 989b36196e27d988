"""Open-Sora-Plan v1.3's DDPM recipe (objectives/ddpm.py) against diffusers and hand-computed values: linear
betas with zero terminal SNR, add_noise / get_velocity, min-SNR-gamma weights (v and epsilon), the masked
weighted loss, and the rank-stratified timesteps (``explicit_uniform_sampling``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from frameloom.config import load_config
from frameloom.errors import FrameloomError
from frameloom.objectives import StepContext, build_objective
from frameloom.objectives.ddpm import (
    DDPMObjective,
    compute_snr,
    ddpm_objective,
    explicit_uniform_timesteps,
    min_snr_loss,
    min_snr_weights,
)


def test_zero_snr_linear_betas_equal_diffusers():
    obj = ddpm_objective(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ref = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ab = obj.schedule.alphas_cumprod
    assert ab[-1].item() == 0.0 and ref.alphas_cumprod[-1].item() == 0.0  # last alpha_bar exactly 0
    torch.testing.assert_close(ab.float(), ref.alphas_cumprod, rtol=0, atol=1e-6)
    plain = ddpm_objective(prediction_type="epsilon")
    torch.testing.assert_close(
        plain.schedule.alphas_cumprod.float(), DDPMScheduler().alphas_cumprod, atol=1e-6, rtol=0
    )
    assert obj.schedule.timestep_spacing == "trailing" and plain.schedule.timestep_spacing == "leading"


def test_noise_and_velocity_equal_diffusers():
    obj = ddpm_objective(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ref = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 8, 2, 4, 4, generator=g)
    inputs = obj.draw(x0, torch.Generator().manual_seed(1))
    t = inputs.t
    torch.testing.assert_close(inputs.x_t, ref.add_noise(x0, inputs.noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.target, ref.get_velocity(x0, inputs.noise, t), rtol=1e-5, atol=1e-6)
    eps = ddpm_objective(prediction_type="epsilon").draw(x0, torch.Generator().manual_seed(1))
    assert torch.equal(eps.target, eps.noise)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_min_snr_weights_equal_upstream_formula(prediction):
    """Open-Sora-Plan's train_t2v_diffusers.py: stack([snr, 5]).min / snr (eps) or / (snr + 1) (v)."""
    obj = ddpm_objective(prediction_type=prediction, rescale_betas_zero_snr=True, snr_gamma=5.0)
    ref = DDPMScheduler(prediction_type=prediction, rescale_betas_zero_snr=True)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 998])
    snr = compute_snr(obj.schedule.alphas_cumprod, t)
    snr_ref = diffusers_compute_snr(ref, t)
    # float64 alpha_bar here, float32 in diffusers: 1 - ab ~ 1e-4 at t = 0 cancels in float32 (measured relative
    # difference 1.7e-4 there, <= 2e-6 from t = 100 on); min(SNR, 5) clips those, the weights agree to 1e-6
    torch.testing.assert_close(snr, snr_ref, rtol=2e-4, atol=0)
    torch.testing.assert_close(snr[2:], snr_ref[2:], rtol=5e-6, atol=0)
    w = torch.stack([snr_ref, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / snr_ref if prediction == "epsilon" else w / (snr_ref + 1)
    torch.testing.assert_close(min_snr_weights(snr, 5.0, prediction), w, rtol=2e-5, atol=1e-7)


def test_min_snr_weights_hand_values():
    snr = torch.tensor([10.0, 2.0, 0.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([5 / 11, 2 / 3, 0.0]))
    # epsilon at SNR 0: upstream divides 0 by 0 (NaN); frameloom takes the limit 1
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([0.5, 1.0, 1.0]))
    with pytest.raises(FrameloomError):
        min_snr_weights(snr, 5.0, "sample")


def test_min_snr_loss_masked_hand_value():
    pred = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    w = torch.tensor([0.5, 2.0])
    # (0.5 * (1 + 4) + 2 * (0 + 16)) / 4 elements
    assert min_snr_loss(pred, target, w).item() == pytest.approx((2.5 + 32) / 4)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # upstream: (loss * mask * w).sum() / mask.sum()
    assert min_snr_loss(pred, target, w, mask).item() == pytest.approx((0.5 * 1 + 2 * 16) / 3)
    up = (F.mse_loss(pred, target, reduction="none").reshape(2, -1) * w.reshape(2, 1)).mean()
    assert min_snr_loss(pred, target, w).item() == pytest.approx(up.item())


def test_explicit_uniform_strata():
    """4 strata of 1000: stratum s draws integers in [250 s, 250 s + 249], covering them."""
    for s in range(4):
        t = explicit_uniform_timesteps(1000, 4, s, 20000, torch.Generator().manual_seed(s))
        assert t.min().item() == 250 * s and t.max().item() == 250 * s + 249
        assert len(torch.unique(t)) == 250
    # the formula, drawn from the same generator: round(U(T s / S - 0.5, T (s + 1) / S - 0.5))
    u = torch.rand(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.round(500 * 1 - 0.5 + u * 500).long()
    assert torch.equal(explicit_uniform_timesteps(1000, 2, 1, 5, torch.Generator().manual_seed(9)), expected)


def test_objective_strata_follow_the_slot():
    """Two processes (data_rank 1 of 2) draw what one process with accumulation 2 draws at micro-step 1."""
    x0 = torch.zeros(64, 1, 1, 1, 1)
    two = DDPMObjective(ddpm_objective().schedule, timestep_sampling="explicit_uniform", grad_accum=1)
    one = DDPMObjective(ddpm_objective().schedule, timestep_sampling="explicit_uniform", grad_accum=2)
    a = two.draw(x0, torch.Generator().manual_seed(3), StepContext(data_rank=1, data_world=2)).t
    b = one.draw(x0, torch.Generator().manual_seed(3), StepContext(micro=1, data_world=1)).t
    assert torch.equal(a, b)
    assert a.min() >= 500 and a.max() <= 999
    c = two.draw(x0, torch.Generator().manual_seed(3), StepContext(data_rank=0, data_world=2)).t
    assert c.max() <= 499


def test_ddpm_from_config_and_errors():
    cfg = load_config(
        None,
        [
            "objective.name=ddpm",
            "objective.prediction_type=v_prediction",
            "objective.rescale_betas_zero_snr=true",
            "objective.snr_gamma=5.0",
            "objective.timestep_sampling=explicit_uniform",
            "train.grad_accum=2",
        ],
    )
    obj = build_objective(cfg)
    assert isinstance(obj, DDPMObjective) and obj.snr_gamma == 5.0 and obj.grad_accum == 2
    assert obj.schedule.alphas_cumprod[-1].item() == 0.0
    inputs = obj.draw(torch.randn(2, 4, 1, 2, 2), torch.Generator().manual_seed(0), StepContext())
    assert inputs.extras["weights"].shape == (2,)
    # timestep_sampling null (the default) is ddpm's own uniform; a flow sampling is refused
    assert build_objective(load_config(None, ["objective.name=ddpm"])).timestep_sampling == "uniform"
    bad = load_config(None, ["objective.name=ddpm", "objective.timestep_sampling=logit_normal"])
    with pytest.raises(FrameloomError, match="timestep_sampling"):
        build_objective(bad)
