"""Flow-matching objective: hand-computed values, sampler statistics, Open-Sora 2.0 shift."""

from __future__ import annotations

import math

import pytest
import torch

from frameloom.objectives import (
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


def test_interpolate_and_target_hand_values() -> None:
    x0 = torch.full((1, 2, 1, 1, 1), 2.0)
    noise = torch.full((1, 2, 1, 1, 1), -1.0)
    t = torch.tensor([0.25])
    # (1 - 0.25) * 2 + 0.25 * (-1) = 1.5 - 0.25 = 1.25
    assert torch.allclose(flow_interpolate(x0, noise, t), torch.full_like(x0, 1.25))
    # -1 - 2 = -3
    assert torch.allclose(flow_target(x0, noise), torch.full_like(x0, -3.0))


def test_interpolate_broadcasts_per_sample() -> None:
    x0 = torch.tensor([[1.0, 1.0], [4.0, 4.0], [0.0, 0.0]])
    noise = torch.tensor([[3.0, 3.0], [0.0, 0.0], [-2.0, -2.0]])
    t = torch.tensor([0.0, 0.5, 1.0])
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-2.0, -2.0]])
    assert torch.equal(flow_interpolate(x0, noise, t), expected)
    assert torch.equal(flow_interpolate(x0, noise, 0.5), (x0 + noise) / 2)


def test_target_is_time_derivative() -> None:
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    t, dt = torch.full((3,), 0.3), 1e-3
    fd = (flow_interpolate(x0, noise, t + dt) - flow_interpolate(x0, noise, t - dt)) / (2 * dt)
    torch.testing.assert_close(fd, flow_target(x0, noise), atol=1e-3, rtol=1e-3)
    fd = (opensora_interpolate(x0, noise, t + dt) - opensora_interpolate(x0, noise, t - dt)) / (2 * dt)
    torch.testing.assert_close(fd, opensora_target(x0, noise), atol=1e-3, rtol=1e-3)


def test_opensora_path_hand_values() -> None:
    x0 = torch.tensor([[2.0]])
    noise = torch.tensor([[-1.0]])
    s = 0.1  # a large s_min so the arithmetic is visible
    # t = 0.25: (0.75)(2) + (1 - 0.9 * 0.75)(-1) = 1.5 - 0.325 = 1.175
    assert math.isclose(float(opensora_interpolate(x0, noise, torch.tensor([0.25]), s)), 1.175, rel_tol=1e-6)
    # target: 0.9 * (-1) - 2 = -2.9
    assert math.isclose(float(opensora_target(x0, noise, s)), -2.9, rel_tol=1e-6)
    # end points: t = 1 is pure noise, t = 0 is data plus s_min noise
    assert float(opensora_interpolate(x0, noise, torch.tensor([1.0]), s)) == -1.0
    assert math.isclose(float(opensora_interpolate(x0, noise, torch.tensor([0.0]), s)), 1.9, rel_tol=1e-6)
    assert OPENSORA_SIGMA_MIN == 1e-5
    # s_min = 0 is plain rectified flow
    t = torch.tensor([0.37])
    torch.testing.assert_close(opensora_interpolate(x0, noise, t, 0.0), flow_interpolate(x0, noise, t))


def test_shift_hand_values() -> None:
    assert shift_timesteps(0.5, 3.0) == 0.75  # 1.5 / 2
    assert math.isclose(shift_timesteps(0.25, 3.0), 0.5)  # 0.75 / 1.5
    assert shift_timesteps(0.0, 3.0) == 0.0 and shift_timesteps(1.0, 3.0) == 1.0
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


def test_opensora_shift_hand_values() -> None:
    assert opensora_shift(256, 1) == 1.0
    # (1 + 768 * 2 / 3840) * sqrt(4) = 1.4 * 2 = 2.8
    assert math.isclose(opensora_shift(1024, 4), 2.8)
    # 4096 tokens per frame (e.g. 128x128 latent after 2x2 patches), 1 frame -> 3.0
    assert math.isclose(opensora_shift(4096, 1), 3.0)


def test_uniform_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_uniform(200_000, g)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002
    assert abs((t < 0.25).float().mean().item() - 0.25) < 0.005


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_statistics(mean: float, std: float) -> None:
    g = torch.Generator().manual_seed(1)
    t = sample_logit_normal(200_000, mean, std, g)
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 1 / (1 + math.exp(-mean))) < 0.005
    logit = torch.log(t.double() / (1 - t.double()))
    assert abs(logit.mean().item() - mean) < 0.01
    assert abs(logit.std().item() - std) < 0.01


def test_samplers_are_seeded() -> None:
    a = sample_logit_normal(10, generator=torch.Generator().manual_seed(5))
    b = sample_logit_normal(10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_caption_dropout_frequency() -> None:
    g = torch.Generator().manual_seed(2)
    m = caption_dropout_mask(200_000, 0.1, g)
    assert m.dtype == torch.bool and m.shape == (200_000,)
    assert abs(m.float().mean().item() - 0.1) < 0.003
    assert not caption_dropout_mask(1000, 0.0, g).any()
    assert caption_dropout_mask(1000, 1.0, g).all()


def test_flow_loss_hand_values() -> None:
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    # per-sample: (1 + 1) / 2 = 1 and (9 + 1) / 2 = 5; batch mean 3
    assert float(flow_loss(pred, target)) == 3.0
    # weighted: (2 * 1 + 0.5 * 5) / 2 = 2.25
    assert float(flow_loss(pred, target, torch.tensor([2.0, 0.5]))) == 2.25


def test_flow_matching_config() -> None:
    fm = FlowMatching(timestep_sampling="uniform", shift=3.0)
    t = fm.sample_t(100_000, torch.Generator().manual_seed(0))
    # P(shifted t < 0.5) = P(u < 0.25) = 0.25 for shift 3
    assert abs((t < 0.5).float().mean().item() - 0.25) < 0.01
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    x_t, target = fm.training_pair(x0, noise, torch.tensor([0.25, 0.25]))
    assert torch.allclose(x_t, torch.full_like(x0, 1.25)) and torch.equal(target, torch.full_like(x0, -3.0))

    os2 = FlowMatching.opensora()
    assert os2.timestep_sampling == "logit_normal" and os2.shift == "auto" and os2.s_min == 1e-5
    # latent 4 frames of 64x64: S = 64 * 64 // 4 = 1024 -> shift 2.8
    assert math.isclose(os2.resolve_shift((4, 64, 64)), 2.8)
    t = os2.sample_t(200_000, torch.Generator().manual_seed(0), latent_size=(4, 64, 64))
    # median of sigmoid(N(0,1)) is 0.5; shifted by 2.8 -> 1.4 / 1.9
    assert abs(t.median().item() - 1.4 / 1.9) < 0.005
    x_t, target = os2.training_pair(x0, noise, torch.tensor([1.0, 1.0]))
    assert torch.allclose(x_t, noise)
    with pytest.raises(ValueError, match="latent_size"):
        os2.sample_t(4)
    with pytest.raises(ValueError):
        FlowMatching(timestep_sampling="cosine")  # type: ignore[arg-type]


def test_draw_applies_auto_shift_from_latent_size():
    """shift='auto' in draw() uses Open-Sora's shift for the latent (T=4, 32x32 -> S=256, a = 1 * sqrt(4) = 2)."""
    x0 = torch.zeros(3, 2, 4, 32, 32)
    auto = FlowMatching(timestep_sampling="uniform", shift="auto").draw(x0, torch.Generator().manual_seed(0))
    raw = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(auto.t, 2 * raw / (1 + raw))
    # x0 = 0: x_t = t * noise and the target is the noise itself.
    assert torch.allclose(auto.x_t, auto.t.view(3, 1, 1, 1, 1) * auto.noise)
    assert torch.equal(auto.target, auto.noise)
    assert FlowMatching().loss(auto.target, auto) == 0
