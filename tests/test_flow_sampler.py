"""Euler flow sampler: time grid, exact recovery on the straight path, classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from frameloom.models.dit import VideoDiT
from frameloom.sampling.flow_euler import euler_sample, flow_timesteps


def test_flow_timesteps_hand_values() -> None:
    assert flow_timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # shift 3: 3t / (1 + 2t) at t = 1, .75, .5, .25, 0
    torch.testing.assert_close(flow_timesteps(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert flow_timesteps(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        flow_timesteps(0)


def _oracle(x0: torch.Tensor, noise: torch.Tensor):
    def model_fn(x, t, text, text_mask):
        return noise - x0

    return model_fn


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (10, 3.0)])
def test_oracle_recovers_x0(steps: int, shift: float) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    noise = torch.randn(2, 4, 3, 8, 8, generator=g)
    text = torch.zeros(2, 3, 8)
    out = euler_sample(_oracle(x0, noise), noise, steps, cond=text, shift=shift)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_explicit_timesteps_and_callback() -> None:
    x0, noise = torch.full((1, 2), 3.0), torch.full((1, 2), -1.0)
    seen: list[int] = []
    grid = torch.tensor([1.0, 0.6, 0.1, 0.0])
    out = euler_sample(
        _oracle(x0, noise), noise, grid, cond=torch.zeros(1, 1, 4), callback=lambda i, x: seen.append(i)
    )
    torch.testing.assert_close(out, x0)
    assert seen == [0, 1, 2]


def _toy_model(calls: list[int]):
    """v = (sum of real text tokens' first channel) everywhere, so the guided v is easy to compute by hand."""

    def model_fn(x, t, text, text_mask):
        calls.append(x.shape[0])
        w = text[..., 0]
        if text_mask is not None:
            w = w * text_mask
        return w.sum(dim=1).view(-1, *([1] * (x.dim() - 1))).expand_as(x)

    return model_fn


def test_guidance_formula() -> None:
    noise = torch.zeros(2, 1, 1, 2, 2)
    cond = torch.tensor([[[3.0], [1.0]], [[5.0], [0.0]]])  # v_c = 4, 5
    uncond = torch.tensor([[[1.0], [0.0]], [[2.0], [0.0]]])  # v_u = 1, 2
    calls: list[int] = []
    out = euler_sample(_toy_model(calls), noise, 1, cond=cond, uncond=uncond, guidance=3.0)
    # v = v_u + 3 (v_c - v_u) = 1 + 9 = 10 and 2 + 9 = 11; one step from t=1 to 0: x = 0 - v
    assert out[0].unique().tolist() == [-10.0] and out[1].unique().tolist() == [-11.0]
    assert calls == [4]  # one batched forward of 2B per step


def test_guidance_one_is_conditional_only() -> None:
    noise = torch.randn(2, 1, 1, 2, 2)
    cond = torch.randn(2, 3, 4)
    uncond = torch.randn(2, 3, 4)
    calls_a: list[int] = []
    calls_b: list[int] = []
    a = euler_sample(_toy_model(calls_a), noise, 5, cond=cond, uncond=uncond, guidance=1.0)
    b = euler_sample(_toy_model(calls_b), noise, 5, cond=cond)
    assert torch.equal(a, b)
    assert calls_a == [2] * 5 == calls_b


def test_guidance_pads_negative_prompt_and_broadcasts() -> None:
    noise = torch.zeros(2, 1, 1, 1, 1)
    cond_text = torch.tensor([[[1.0], [2.0], [9.0]], [[4.0], [0.0], [0.0]]])
    cond = (cond_text, torch.tensor([[True, True, False], [True, False, False]]))
    uncond = (torch.tensor([[[0.5]]]), None)  # one short negative prompt for the whole batch, v_u = 0.5
    out = euler_sample(_toy_model([]), noise, 1, cond=cond, uncond=uncond, guidance=2.0)
    # v_c = 3, 4 -> v = 0.5 + 2 * (v_c - 0.5) = 5.5, 7.5
    assert out.flatten().tolist() == [-5.5, -7.5]


def test_guidance_needs_uncond() -> None:
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(_toy_model([]), torch.zeros(1, 1), 2, cond=torch.zeros(1, 1, 1), guidance=5.0)


def test_with_dit_is_deterministic() -> None:
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, text_dim=8, hidden_size=32, depth=1, num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    noise = torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = (torch.randn(1, 3, 8), torch.tensor([[True, True, False]]))
    uncond = (torch.zeros(1, 1, 8), torch.tensor([[True]]))
    a = euler_sample(model, noise, 4, cond=cond, uncond=uncond, guidance=4.0, shift=2.0)
    b = euler_sample(model, noise, 4, cond=cond, uncond=uncond, guidance=4.0, shift=2.0)
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.shape == noise.shape
