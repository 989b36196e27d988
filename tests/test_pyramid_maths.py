"""Pyramid Flow's maths against hand-computed values (SEED_FACTS.md, upstream PyramidFlowMatchEulerDiscreteScheduler
and pyramid_dit_for_video_gen_pipeline.py): stage sigmas, timestep slices, jump coefficients, block noise,
pyramids, the stage mix, the AR position table and history layout, and the two objectives' draws."""

from __future__ import annotations

import math

import pytest
import torch

from frameloom.errors import FrameloomError
from frameloom.objectives.base import StepContext
from frameloom.objectives.pyramid import (
    PyramidFlow,
    PyramidFlowAR,
    PyramidOptions,
    ar_history,
    ar_turn,
    block_noise,
    check_ar_frames,
    corrected_start_sigma,
    jump_coefficients,
    latent_pyramid,
    noise_pyramid,
    pyramid_schedule,
    sample_stage_length,
    stage_assignment,
    stage_ratios,
    stage_timesteps,
)


def test_stage_sigmas_match_the_released_schedule():
    s = pyramid_schedule()
    # end sigmas: the global grid at indices 333 and 666 (sigma = 1 - i / 1000), the last stage ends at 0
    assert s.end_sigmas == pytest.approx((0.667, 0.334, 0.0), abs=1e-6)
    assert s.original_start_sigmas == pytest.approx((1.0, 0.667, 0.334), abs=1e-6)
    # corrected: s = 1 - orig; c = s / (2 (1 - s) + s) with sqrt(1 + 1/gamma) = 2
    assert s.start_sigmas[0] == 1.0
    assert s.start_sigmas[1] == pytest.approx(1 - 0.333 / (2 * 0.667 + 0.333), abs=1e-6)  # 0.80024
    assert s.start_sigmas[2] == pytest.approx(1 - 0.666 / (2 * 0.334 + 0.666), abs=1e-6)  # 0.50075
    assert round(s.start_sigmas[1], 5) == 0.80024 and round(s.start_sigmas[2], 5) == 0.50075
    assert corrected_start_sigma(1.0, 1 / 3) == 1.0


def test_timestep_slices_are_proportional_to_the_sigma_spans():
    s = pyramid_schedule()
    assert s.timestep_ranges == ((1000.0, 744.0), (744.0, 386.0), (386.0, 1.0))
    # spans 0.333, 0.46624, 0.50075 of 1.29999: stage 0 gets int(0.256156 * 1000) = 256 grid points
    spans = [a - b for a, b in zip(s.start_sigmas, s.end_sigmas)]
    assert int(spans[0] / sum(spans) * 1000) == 256 and int((spans[0] + spans[1]) / sum(spans) * 1000) == 614
    t0 = stage_timesteps(s, 0)
    assert t0.shape == (1000,) and t0[0] == 1000.0 and t0[1] == pytest.approx(1000 - 256 / 1000, abs=1e-9)
    assert stage_timesteps(s, 2)[-1] == pytest.approx(1 + 385 / 1000, abs=1e-9)  # 1.385: the end 1 excluded
    # sampling: linspace over the grid's ends; ratios 1 .. 0.001 then 0
    assert stage_timesteps(s, 1, 3).tolist() == pytest.approx([744.0, (744.0 + 386.358) / 2, 386.358])
    assert stage_ratios(s, 3).tolist() == pytest.approx([1.0, 0.5005, 0.001, 0.0])


def test_jump_coefficients():
    # stage 1: s0 = 1 - 0.667 = 0.333; a = 1 / (2 * 0.667 + 0.333); b = a * 0.667 / sqrt(1/3)
    a, b = jump_coefficients(0.667, 1 / 3)
    assert a == pytest.approx(1 / 1.667) and b == pytest.approx(0.667 / 1.667 * math.sqrt(3))
    a2, b2 = jump_coefficients(0.334, 1 / 3)
    assert a2 == pytest.approx(1 / (2 * 0.334 + 0.666)) and b2 == pytest.approx(a2 * 0.334 * math.sqrt(3))
    # after the jump the signal coefficient a (1 - orig sigma) is the corrected start's 1 - sigma
    for orig in (0.667, 0.334):
        a, _ = jump_coefficients(orig, 1 / 3)
        assert a * (1 - orig) == pytest.approx(1 - corrected_start_sigma(orig, 1 / 3))


def test_block_noise_covariance_over_many_draws():
    g = torch.Generator().manual_seed(0)
    n = block_noise((4000, 1, 1, 4, 4), 1 / 3, g)  # 16000 blocks
    blocks = n.reshape(4000, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)  # (blocks, 4 values)
    cov = torch.cov(blocks.T)
    expected = (1 + 1 / 3) * torch.eye(4) - 1 / 3 * torch.ones(4, 4)  # 1 on the diagonal, -1/3 off it
    assert torch.allclose(cov, expected, atol=0.04)
    # different blocks are independent
    a, b = n[:, 0, 0, 0, 1], n[:, 0, 0, 0, 2]  # neighbours across a block edge
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.06
    with pytest.raises(FrameloomError, match="even"):
        block_noise((1, 1, 1, 3, 4), 1 / 3, g)


def test_pyramids():
    x = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    low, mid, full = latent_pyramid(x, 3)
    assert full is x and mid.shape[-2:] == (2, 2) and low.shape[-2:] == (1, 1)
    assert mid[0, 0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # 2x2 block means
    assert low.item() == 7.5
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 1, 2, 16, 16, generator=g)
    levels = noise_pyramid(noise, 3)
    assert [tuple(v.shape[-2:]) for v in levels] == [(4, 4), (8, 8), (16, 16)]
    for level in levels:  # 2 * block mean keeps unit variance
        assert float(level.var()) == pytest.approx(1.0, abs=0.05)


def test_stage_assignment_by_batch_position():
    assert stage_assignment(4) == [0, 1, 1, 2]
    assert stage_assignment(8) == [0, 1, 1, 2, 0, 1, 1, 2]
    assert stage_assignment(6, (1, 1, 1)) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(FrameloomError, match="multiple of 4"):
        stage_assignment(6)


def test_sample_stage_length_table():
    # G = 8 ranks, 16 latent units: two turns; turn 0 trains positions 1..8, turn 1 positions 9..16
    table = [[sample_stage_length(16, r, 8, turn) for r in range(8)] for turn in range(2)]
    assert [row[2] for row in table[0]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [row[2] for row in table[1]] == [9, 10, 11, 12, 13, 14, 15, 16]
    for turn in table:
        for low, mid, high in turn:  # low/mid units balance the tokens: mid = low = 17 - high
            assert low == mid == 17 - high
    # G = 16: one turn, rank r trains position r + 1
    assert [sample_stage_length(16, r, 16, 0) for r in (0, 7, 15)] == [[16, 16, 1], [9, 9, 8], [1, 1, 16]]
    # clamped to a shorter clip's own units
    assert sample_stage_length(16, 2, 8, 1, max_units=5) == [5, 5, 5]
    # the turn is a pure function of the micro-step count
    assert [ar_turn(c, 16, 8) for c in range(5)] == [0, 1, 0, 1, 0]
    assert [ar_turn(c, 16, 16) for c in range(3)] == [0, 0, 0]


def test_ar_frame_rules_are_config_errors():
    assert check_ar_frames(16, 1, 8) == 16
    assert check_ar_frames(17, 2, 1) == 9
    with pytest.raises(FrameloomError, match="does not divide the 12 latent units"):
        check_ar_frames(12, 1, 8)
    with pytest.raises(FrameloomError, match="do not split"):
        check_ar_frames(16, 2, 1)
    with pytest.raises(FrameloomError, match="larger than"):
        check_ar_frames(4, 1, 8)


def test_ar_history_layout():
    # 5 past units, trained unit at stage 2: previous at stage 2, the one before at stage 1, the rest at stage 0
    past = [torch.arange(5.0).reshape(1, 1, 5, 1, 1) + 10 * k for k in range(3)]  # level k holds 10 k + frame
    hist = ar_history(past, 2, 1)
    assert [h[0, 0, :, 0, 0].tolist() for h in hist] == [[0.0, 1.0, 2.0], [13.0], [24.0]]
    assert [h[0, 0, :, 0, 0].tolist() for h in ar_history(past, 1, 1)] == [[0.0, 1.0, 2.0, 3.0], [14.0]]
    assert [h[0, 0, :, 0, 0].tolist() for h in ar_history(past, 0, 1)] == [[0.0, 1.0, 2.0, 3.0], [4.0]]
    assert ar_history([p[:, :, :0] for p in past], 2, 1) == []
    # frame_per_unit 2: past = first frame + 2 units of 2 frames
    assert [h[0, 0, :, 0, 0].tolist() for h in ar_history(past, 2, 2)] == [[0.0], [11.0, 12.0], [23.0, 24.0]]


def _latents(b=4, t=5, h=8, w=8, seed=0):
    return torch.randn(b, 2, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_pyramid_flow_draw_builds_each_stage_from_its_endpoints():
    obj = PyramidFlow()
    x0 = _latents()
    inputs = obj.draw(x0, torch.Generator().manual_seed(0))
    assert [g.tolist() for g in inputs.extras["groups"]] == [[0], [1, 2], [3]]
    assert [tuple(x.shape[-2:]) for x in inputs.x_t] == [(2, 2), (4, 4), (8, 8)]
    s = obj.schedule
    clean, noise = latent_pyramid(x0, 3), noise_pyramid(inputs.noise, 3)
    for k, idx in enumerate(inputs.extras["groups"]):
        # recover r from the timestep: t = t_first + r-index steps; x_t = r start + (1 - r) end, v = start - end
        grid = stage_timesteps(s, k)
        i = torch.tensor([int(torch.argmin((grid - t).abs())) for t in inputs.t[k]])
        r = (1 - i / 1000).reshape(-1, 1, 1, 1, 1)
        if k == 0:
            start = noise[0][idx]
        else:
            up = clean[k - 1][idx].repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest 2x
            start = s.start_sigmas[k] * noise[k][idx] + (1 - s.start_sigmas[k]) * up
        end = (
            clean[k][idx]
            if k == 2
            else s.end_sigmas[k] * noise[k][idx] + (1 - s.end_sigmas[k]) * clean[k][idx]
        )
        torch.testing.assert_close(inputs.target[k], start - end)
        torch.testing.assert_close(inputs.x_t[k], r * start + (1 - r) * end, rtol=1e-5, atol=1e-5)
    # loss: the mean over samples of each sample's MSE
    preds = [torch.zeros_like(t) for t in inputs.target]
    per = torch.cat([(t**2).flatten(1).mean(1) for t in inputs.target])
    assert float(obj.loss(preds, inputs)) == pytest.approx(float(per.mean()), rel=1e-6)


def test_pyramid_flow_ar_draw_trains_the_last_unit_with_a_history_pyramid():
    obj = PyramidFlowAR(PyramidOptions(), max_units=8, grad_accum=1)
    x0 = _latents(t=8)
    ctx = StepContext(step=1, sync_rank=1, sync_size=4)  # turn 1 % 2 = 1: high = 2 + 4 = 6 units
    assert obj.units_per_stage(ctx, 8) == [3, 3, 6]
    inputs = obj.draw(x0, torch.Generator().manual_seed(0), ctx)
    assert inputs.extras["units"] == [3, 3, 6]
    # only one latent frame (the last unit) is noised and scored per stage
    assert [tuple(x.shape) for x in inputs.x_t] == [(1, 2, 1, 2, 2), (2, 2, 1, 4, 4), (1, 2, 1, 8, 8)]
    assert [tuple(t.shape) for t in inputs.target] == [tuple(x.shape) for x in inputs.x_t]
    hist = inputs.extras["history"]
    # stage 2 with 6 units: previous unit at 8x8, one at 4x4, the 3 older frames at 2x2 (oldest first)
    assert [tuple(h.shape[2:]) for h in hist[2]] == [(3, 2, 2), (1, 4, 4), (1, 8, 8)]
    # stage 0 with 3 units: everything at 2x2, the previous unit last
    assert [tuple(h.shape[2:]) for h in hist[0]] == [(1, 2, 2), (1, 2, 2)]
    # history is corrupted by at most corrupt_ratio: |h - clean| small but nonzero
    clean_prev = x0[3:4, :, 4:5]  # stage 2 sample (batch position 3), unit before the 6th
    diff = (hist[2][-1] - clean_prev).abs().max()
    assert 0 < float(diff) < 3.0
    # the first position (1 unit) has no history
    first = PyramidFlowAR(PyramidOptions(), max_units=8).draw(
        x0, torch.Generator().manual_seed(0), StepContext(sync_size=4)
    )
    assert first.extras["units"] == [8, 8, 1] and first.extras["history"][2] == []
    assert PyramidFlowAR.uses_video_sync_group and not PyramidFlow.uses_video_sync_group


def test_options_reject_unknown_keys():
    with pytest.raises(FrameloomError, match="unknown objective.pyramid key"):
        PyramidOptions.from_dict({"stage_ratio": [1, 2, 1]})
    with pytest.raises(FrameloomError, match="stage_ratios"):
        PyramidOptions.from_dict({"stage_ratios": [1, 2]})
