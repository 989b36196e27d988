"""Improved-DDPM maths of the dit_class family against hand-computed values and diffusers' DDPMScheduler.

(Parity with facebookresearch/DiT's own gaussian_diffusion.py / respace.py, run at tiny size outside the
repository, is recorded in docs/dit_class.md: losses and 10-step DDPM/DDIM loops identical.)
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from frameloom.errors import FrameloomError
from frameloom.models.dit_class.sampling import guided_output
from frameloom.objectives import iddpm

B1 = 1e-4 + (0.02 - 1e-4) / 999  # the second linear beta


@pytest.fixture(scope="module")
def tables() -> iddpm.DiffusionTables:
    return iddpm.DiffusionTables(iddpm.linear_betas(1000))


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type="learned_range", clip_sample=False,
    )  # fmt: skip


def test_linear_betas_hand_values(tables, scheduler):
    b = tables.betas
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[1].item() == pytest.approx(B1, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    # N = 500 doubles every beta (DiT's "linear" schedule is scaled by 1000 / N)
    assert iddpm.linear_betas(500)[0].item() == pytest.approx(2e-4, abs=1e-15)
    assert torch.allclose(tables.alphas_cumprod.float(), scheduler.alphas_cumprod, atol=1e-7)


def test_q_sample_hand_and_diffusers(tables, scheduler):
    x0 = torch.tensor([[0.5, -1.0]]).reshape(1, 2, 1, 1)
    noise = torch.tensor([[2.0, 1.0]]).reshape(1, 2, 1, 1)
    out = iddpm.q_sample(tables, x0, torch.tensor([0]), noise).flatten()
    # t = 0: sqrt(1 - 1e-4) x0 + sqrt(1e-4) noise
    assert out[0].item() == pytest.approx(math.sqrt(1 - 1e-4) * 0.5 + 0.01 * 2.0, abs=1e-7)
    assert out[1].item() == pytest.approx(-math.sqrt(1 - 1e-4) + 0.01, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.allclose(iddpm.q_sample(tables, x0, t, noise), scheduler.add_noise(x0, noise, t), atol=1e-5)


def test_posterior_mean_variance_hand_and_diffusers(tables, scheduler):
    ab0 = 1 - 1e-4
    ab1 = ab0 * (1 - B1)
    var1 = B1 * (1 - ab0) / (1 - ab1)
    x0, xt = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -0.7)
    mean, var, log_var = iddpm.q_posterior_mean_variance(tables, x0, xt, torch.tensor([1]))
    coef1 = B1 * math.sqrt(ab0) / (1 - ab1)
    coef2 = (1 - ab0) * math.sqrt(1 - B1) / (1 - ab1)
    assert mean.item() == pytest.approx(coef1 * 0.3 + coef2 * -0.7, rel=1e-6)
    assert var.item() == pytest.approx(var1, rel=1e-6)
    # the log variance at t = 0 is clipped to t = 1's (the posterior variance is 0 there)
    _, var0, log_var0 = iddpm.q_posterior_mean_variance(tables, x0, xt, torch.tensor([0]))
    assert var0.item() == 0.0 and log_var0.item() == pytest.approx(math.log(var1), rel=1e-6)
    assert log_var.item() == pytest.approx(math.log(var1), rel=1e-6)
    # diffusers: the posterior mean is step()'s x_{t-1} minus its noise term (prediction_type="sample")
    sched = DDPMScheduler(
        beta_schedule="linear", variance_type="fixed_small", prediction_type="sample", clip_sample=False
    )
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for t in (1, 37, 500, 999):
        prev = sched.step(x0, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        ref_mean = prev - sched._get_variance(t) ** 0.5 * z
        mean, var, _ = iddpm.q_posterior_mean_variance(tables, x0, xt, torch.full((2,), t))
        # diffusers computes the coefficients in float32: 1 - alpha_bar is ~2e-4 at t = 1, hence the tolerance
        assert (mean - ref_mean).abs().max().item() < (5e-4 if t == 1 else 2e-5)
        assert var[0, 0, 0, 0].item() == pytest.approx(sched._get_variance(t).item(), rel=1e-4)


def test_learned_range_variance_hand_and_diffusers(tables, scheduler):
    v = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(4, 1, 1, 1)
    t = torch.full((4,), 1)
    log_var = iddpm.learned_range_log_variance(tables, v, t).flatten()
    lo, hi = math.log(B1 * (1e-4) / (1 - (1 - 1e-4) * (1 - B1))), math.log(B1)
    assert log_var.tolist() == pytest.approx([lo, (lo + hi) / 2, hi, 0.25 * lo + 0.75 * hi], rel=1e-6)
    # diffusers' learned_range returns the same log variance for t >= 1 ...
    for step in (1, 10, 500, 999):
        for value in (-1.0, -0.3, 0.8):
            ref = scheduler._get_variance(step, predicted_variance=torch.tensor(value))
            ours = iddpm.learned_range_log_variance(tables, torch.full((1, 1), value), torch.tensor([step]))
            assert ours.item() == pytest.approx(ref.item(), rel=1e-4)  # diffusers: float32 tables
    # ... but at t = 0 it interpolates towards log(1e-20) (the unclipped posterior variance), DiT towards
    # the clipped one: a real difference between the two implementations, so DiT's is the reference here.
    ref0 = scheduler._get_variance(0, predicted_variance=torch.tensor(-1.0)).item()
    ours0 = iddpm.learned_range_log_variance(tables, torch.full((1, 1), -1.0), torch.tensor([0])).item()
    assert ref0 == pytest.approx(math.log(1e-20), rel=1e-5) and ours0 == pytest.approx(lo, rel=1e-6)


def test_normal_kl_known_pair():
    # KL(N(0, 1) || N(1, e^2)) = 0.5 (-1 + 2 - 0 + e^-2 + 1 e^-2) = 0.5 + e^-2
    kl = iddpm.normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0))
    assert kl.item() == pytest.approx(0.5 + math.exp(-2), rel=1e-6)
    same = iddpm.normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0))
    assert same.item() == 0.0


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_discretized_gaussian_log_likelihood_hand():
    scale = 0.02
    x = torch.tensor([0.0, -1.0, 1.0, 0.1])
    means = torch.tensor([0.0, -0.99, 0.995, 0.1 + 0.5 / 255])
    ll = iddpm.discretized_gaussian_log_likelihood(x, means, torch.full((4,), math.log(scale)))
    half = 1 / 255 / scale
    assert ll[0].item() == pytest.approx(math.log(_cdf(half) - _cdf(-half)), rel=1e-5)
    assert ll[1].item() == pytest.approx(
        math.log(_cdf((-1 + 0.99 + 1 / 255) / scale)), rel=1e-5
    )  # lowest bin
    assert ll[2].item() == pytest.approx(
        math.log(1 - _cdf((1 - 0.995 - 1 / 255) / scale)), rel=1e-5
    )  # top bin
    off = 0.5 / 255 / scale
    assert ll[3].item() == pytest.approx(math.log(_cdf(half - off) - _cdf(-half - off)), rel=1e-5)


def test_vb_term_at_t0_is_the_decoder_nll_and_kl_vanishes_for_a_perfect_model(tables):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    t0 = torch.zeros(2, dtype=torch.long)
    x1 = iddpm.q_sample(tables, x0, t0, noise)
    out = torch.cat([noise * 0.9, v], dim=1)
    p = iddpm.p_mean_variance(tables, out, x1, t0)
    nll = -iddpm.discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    expected = nll.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(iddpm.vb_terms_bits(tables, out, x0, x1, t0), expected)
    # t > 0 with the true noise and v = -1 (the posterior variance): KL(q || p) = 0
    t = torch.tensor([10, 700])
    xt = iddpm.q_sample(tables, x0, t, noise)
    perfect = torch.cat([noise, -torch.ones_like(x0)], dim=1)
    assert iddpm.vb_terms_bits(tables, perfect, x0, xt, t).abs().max().item() < 1e-5


def test_hybrid_loss_stops_the_mean_gradient_in_the_vb_term(tables):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 2, 3, 3, generator=g).clamp(-1, 1), torch.randn(2, 2, 3, 3, generator=g)
    t = torch.tensor([5, 400])
    xt = iddpm.q_sample(tables, x0, t, noise)
    out = torch.randn(2, 4, 3, 3, generator=g).requires_grad_(True)
    terms = iddpm.hybrid_loss(tables, out, x0, xt, t, noise)
    terms["vb"].sum().backward()
    assert out.grad[:, :2].abs().max().item() == 0.0  # no gradient to eps from L_vb
    assert out.grad[:, 2:].abs().max().item() > 0.0
    mse = ((noise - out[:, :2].detach()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["mse"], mse) and torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_respacing_to_250_steps(tables):
    kept = iddpm.space_timesteps(1000, [250])
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    stride = 999 / 249
    assert kept[:6] == [round(k * stride) for k in range(6)] == [0, 4, 8, 12, 16, 20]
    assert kept[124] == round(124 * stride) == 497
    spaced = iddpm.respace(tables, kept)
    assert spaced.timestep_map.tolist() == kept
    # the spaced process keeps alpha_bar exactly at the kept steps: beta'_1 = 1 - ab[4] / ab[0]
    ab = tables.alphas_cumprod
    assert spaced.betas[1].item() == pytest.approx(1 - (ab[4] / ab[0]).item(), rel=1e-12)
    assert torch.allclose(spaced.alphas_cumprod, ab[kept], rtol=1e-12)
    # diffusers: DDPMScheduler on DiT's 250 timesteps (custom timesteps) steps with beta'_i = 1 - ab_t / ab_prev,
    # so its learned-range variance is the respaced process's (diffusers' own set_timesteps(250) "leading"
    # spacing would take 996, 992, ..., 0 instead: not DiT's)
    sched = DDPMScheduler(beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(timesteps=kept[::-1])
    for i in (1, 2, 124, 249):
        for value in (-1.0, 0.4):
            ref = sched._get_variance(kept[i], predicted_variance=torch.tensor(value)).item()
            ours = iddpm.learned_range_log_variance(
                spaced, torch.full((1, 1), value), torch.tensor([i])
            ).item()
            assert ours == pytest.approx(ref, rel=2e-4)
    # sections and DDIM strides as DiT's space_timesteps
    assert iddpm.space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]
    assert iddpm.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(FrameloomError):
        iddpm.space_timesteps(10, [6, 1])


def test_ddim_step_eta0_hand(tables):
    spaced = iddpm.respace(tables, iddpm.space_timesteps(1000, [10]))
    x_t, x0 = torch.full((1, 1), 0.4), torch.full((1, 1), -0.2)
    t = torch.tensor([3])
    ab, ab_prev = spaced.alphas_cumprod[3].item(), spaced.alphas_cumprod[2].item()
    eps = (math.sqrt(1 / ab) * 0.4 + 0.2) / math.sqrt(1 / ab - 1)
    expected = -0.2 * math.sqrt(ab_prev) + math.sqrt(1 - ab_prev) * eps
    assert iddpm.ddim_step(spaced, x_t, t, x0, 0.0, None).item() == pytest.approx(expected, rel=1e-5)


def test_guidance_on_the_first_channels_only():
    cond = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]]).reshape(1, 8, 1, 1)
    uncond = torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0, 9.0]]).reshape(1, 8, 1, 1)
    out = guided_output(torch.cat([cond, uncond]), 4.0, 3, 4).flatten().tolist()
    assert out == [4.0, 4.0, 4.0, 1.0, 5.0, 5.0, 5.0, 5.0]  # 3 guided eps channels, the rest conditional
    assert guided_output(torch.cat([cond, uncond]), 4.0, None, 4).flatten().tolist()[:4] == [4.0] * 4


def test_objective_draw_is_keyed_by_the_generator_and_loss_is_finite():
    obj = iddpm.ImprovedDDPM()
    x0 = torch.zeros(3, 2, 1, 4, 4)
    a = obj.draw(x0, torch.Generator().manual_seed(5))
    b = obj.draw(x0, torch.Generator().manual_seed(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise)
    assert a.t.dtype == torch.float32 and int(a.t.max()) < 1000
    loss = obj.loss(torch.zeros(3, 4, 1, 4, 4), a)
    assert torch.isfinite(loss)
    with pytest.raises(FrameloomError, match="2 x 2 output channels"):
        obj.loss(torch.zeros(3, 2, 1, 4, 4), a)
