"""Pyramid Flow's samplers with a stand-in velocity: the stage-by-stage Euler steps with the renoising jump,
the timesteps each stage feeds the model, AR generation unit by unit with its history pyramid and separate
first-frame / video guidance, image-to-video, and per-seed determinism."""

from __future__ import annotations

import pytest
import torch

from frameloom.objectives.pyramid import (
    block_noise,
    jump_coefficients,
    pyramid_schedule,
    stage_timesteps,
    upsample2,
)
from frameloom.sampling.pyramid import coarse_noise, denoise_stages, generate_ar, guided_velocity


def test_stage_euler_with_the_jump():
    s = pyramid_schedule()
    calls = []

    def velocity(x, t, history):
        calls.append((tuple(x.shape[-2:]), float(t)))
        return torch.ones_like(x)  # v = 1: each stage moves x by (0 - 1) * 1 = -1 over its steps

    x0 = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = denoise_stages(velocity, x0, s, [2, 3, 2], [torch.Generator().manual_seed(5)])
    # model calls: 2 at 2x2, 3 at 4x4, 2 at 8x8, with each stage's timesteps
    assert [c[0] for c in calls] == [(2, 2)] * 2 + [(4, 4)] * 3 + [(8, 8)] * 2
    assert [c[1] for c in calls[2:5]] == pytest.approx(stage_timesteps(s, 1, 3).tolist())
    assert calls[0][1] == 1000.0 and calls[-1][1] == pytest.approx(1.385)
    # by hand: Euler over ratios 1 -> 0 with v = 1 subtracts 1 per stage; the jumps renoise with block noise
    g = torch.Generator().manual_seed(5)
    x = x0 - 1
    for k in (1, 2):
        a, b = jump_coefficients(s.original_start_sigmas[k], s.gamma)
        x = upsample2(x)
        x = a * x + b * block_noise(x.shape, s.gamma, g)
        x = x - 1
    torch.testing.assert_close(out, x)


def test_ar_generation_unit_by_unit_with_history_and_two_guidances():
    s = pyramid_schedule()
    seen = []

    def first(x, t, history):
        seen.append(("first", x.shape[2], [tuple(h.shape[2:]) for h in history]))
        return torch.zeros_like(x)

    def video(x, t, history):
        seen.append(("video", x.shape[2], [tuple(h.shape[2:]) for h in history]))
        return torch.zeros_like(x)

    gens = [torch.Generator().manual_seed(1)]
    out = generate_ar(first, video, (1, 2, 4, 8, 8), s, [1, 1, 1], [1, 1, 1], 1, gens, torch.device("cpu"))
    assert out.shape == (1, 2, 4, 8, 8)
    assert [k for k, *_ in seen] == ["first"] * 3 + ["video"] * 9  # 3 stages per unit
    # the last unit (3 frames before it): stage 2 sees 2 frames at 2x2, one at 4x4, the previous at 8x8
    assert seen[-1] == ("video", 1, [(1, 2, 2), (1, 4, 4), (1, 8, 8)])
    assert seen[-3] == ("video", 1, [(2, 2, 2), (1, 2, 2)])  # stage 0: all history at 2x2
    # image to video: frame 0 is the given latent, untouched; only the later units are generated
    seen.clear()
    image = torch.full((1, 2, 1, 8, 8), 0.5)
    out = generate_ar(
        first, video, (1, 2, 4, 8, 8), s, [1, 1, 1], [1, 1, 1], 1, gens, torch.device("cpu"), image
    )
    assert torch.equal(out[:, :, :1], image) and all(k == "video" for k, *_ in seen)


def test_guidance_batches_uncond_and_cond():
    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, text, mask, pooled=None, history=()):
            # velocity = the pooled value: uncond rows 0, cond rows 1
            return x * 0 + pooled[:, :1, None, None, None] * self.w

    cond = (torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4))
    uncond = (torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 4))
    v = guided_velocity(Echo(), cond, uncond, 7.0)(torch.zeros(1, 2, 1, 2, 2), torch.tensor(500.0), [])
    assert torch.equal(v, torch.full_like(v, 7.0))  # 0 + 7 (1 - 0)
    v1 = guided_velocity(Echo(), cond, uncond, 1.0)(torch.zeros(1, 2, 1, 2, 2), torch.tensor(500.0), [])
    assert torch.equal(v1, torch.ones_like(v1))  # guidance 1: the conditional prediction, one pass


def test_noise_depends_on_the_seed_only():
    a = coarse_noise((2, 2, 3, 8, 8), 3, [torch.Generator().manual_seed(s) for s in (4, 5)])
    b = coarse_noise((1, 2, 3, 8, 8), 3, [torch.Generator().manual_seed(5)])
    assert a.shape == (2, 2, 3, 2, 2)
    torch.testing.assert_close(a[1:], b)  # the second video's noise does not depend on the first
    assert not torch.equal(a[0], a[1])
