"""Open-Sora 2.0's recipe by hand: the resolution-and-length shift, x_t and the target with sigma_min, T5 and CLIP
dropped independently (frequencies over many draws, in the trainer's draw order), the image-conditioning mix
(frequencies and tensors), the motion-score caption rule, and the objective built from a config."""

from __future__ import annotations

import math

import pytest
import torch

from frameloom.config import load_config
from frameloom.data.captions import CaptionRules, apply_caption_rules, motion_score, row_caption
from frameloom.errors import FrameloomError
from frameloom.models.opensora2.family import build_objective
from frameloom.models.opensora2.objective import OpenSoraFlow, condition_tensor, draw_conditions
from frameloom.objectives.flow import FlowMatching, caption_dropout_mask
from frameloom.train.trainer import step_generator

P_DROP = 0.31622777  # sqrt(0.1), Open-Sora's dropout_ratio for t5 and clip


def test_shift_for_tokens_per_frame_and_latent_frames_by_hand():
    flow = FlowMatching.opensora()
    # 256px, 129 frames with the HunyuanVideo VAE: latent 33 x 32 x 32 -> S = 32 * 32 / 4 = 256: factor 1
    assert flow.resolve_shift((33, 32, 32)) == pytest.approx(math.sqrt(33))
    # 768px, 33 latent frames: latent 96 x 96 -> S = 2304: 1 + 2048 * 2 / 3840 = 2.0667, times sqrt(33)
    assert flow.resolve_shift((33, 96, 96)) == pytest.approx((1 + 2048 * 2 / 3840) * math.sqrt(33))
    # an image at 1024 tokens per frame: (1 + 768 * 2 / 3840) * 1 = 1.4; t = 0.5 -> 1.4 * 0.5 / (1 + 0.4 * 0.5)
    a = flow.resolve_shift((1, 64, 64))
    assert a == pytest.approx(1.4)
    assert 1.4 * 0.5 / (1 + 0.4 * 0.5) == pytest.approx(0.58333333)


def test_x_t_and_target_with_sigma_min_by_hand():
    flow = FlowMatching.opensora()
    x0, noise, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    x_t, target = flow.training_pair(x0, noise, t)
    # x_t = (1 - t) x0 + (1 - (1 - s)(1 - t)) eps = 0.75 * 2 + (1 - 0.99999 * 0.75) * -1
    assert x_t.item() == pytest.approx(1.5 - (1 - 0.99999 * 0.75))
    assert target.item() == pytest.approx(0.99999 * -1 - 2)  # (1 - s_min) eps - x0
    # at t = 0 a residual s_min of noise remains (Open-Sora's t_rev = 1)
    x_0, _ = flow.training_pair(x0, noise, torch.tensor([0.0]))
    assert x_0.item() == pytest.approx(2.0 - 1e-5)


def test_t5_and_clip_are_dropped_independently_with_sqrt_point_one():
    """The trainer's draws for one micro-batch: the objective (times, noise, conditions), then the token
    dropout, then the extras dropout, all from the (seed, step, slot) generator."""
    objective = OpenSoraFlow(FlowMatching.opensora(), {"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1})
    x0 = torch.zeros(50, 4, 2, 2, 2)
    t5, clip = [], []
    for step in range(200):  # 10,000 samples
        g = step_generator(0, step, 0)
        objective.draw(x0, g)
        t5.append(caption_dropout_mask(50, P_DROP, g))
        clip.append(caption_dropout_mask(50, P_DROP, g))
    t5, clip = torch.cat(t5).float(), torch.cat(clip).float()
    n = t5.numel()
    sd = math.sqrt(P_DROP * (1 - P_DROP) / n)  # 0.0047
    assert abs(t5.mean() - P_DROP) < 4 * sd and abs(clip.mean() - P_DROP) < 4 * sd
    both = (t5 * clip).mean()  # independent: 0.1 of the samples lose both (the unconditional ones)
    assert abs(both - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    assert abs(((1 - t5) * (1 - clip)).mean() - (1 - P_DROP) ** 2) < 0.02


def test_conditioning_mix_frequencies_and_tensors():
    g = torch.Generator().manual_seed(0)
    kinds = draw_conditions(40_000, {"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1}, g)
    for kind, p in (("t2v", 1 / 8), ("i2v_head", 5 / 8), ("i2v_loop", 1 / 8), ("i2v_tail", 1 / 8)):
        assert abs(kinds.count(kind) / 40_000 - p) < 4 * math.sqrt(p * (1 - p) / 40_000), kind
    x0 = torch.arange(4 * 2 * 3 * 1 * 1, dtype=torch.float32).reshape(4, 2, 3, 1, 1) + 1
    cond = condition_tensor(x0, ["t2v", "i2v_head", "i2v_loop", "i2v_tail"])  # (B, 1 + C, T, 1, 1)
    assert cond.shape == (4, 3, 3, 1, 1)
    masks = cond[:, 0, :, 0, 0].tolist()
    assert masks == [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]]
    assert torch.equal(cond[1, 1:, 0], x0[1, :, 0]) and cond[1, 1:, 1:].abs().sum() == 0  # the clip's frame 0
    assert torch.equal(cond[3, 1:, 2], x0[3, :, 2]) and cond[0, 1:].abs().sum() == 0
    # an image is never conditioned
    assert condition_tensor(x0[:, :, :1], ["i2v_head"] * 4).abs().sum() == 0


def test_objective_from_the_config_draws_resumably(tmp_path):
    cfg = load_config(
        None,
        [
            "model.family=opensora2",
            "model.config={cond_embed: true, condition_config: {t2v: 1, i2v_head: 5, i2v_loop: 1, i2v_tail: 1}}",
        ],
    )
    objective = build_objective(cfg)
    assert objective.flow.shift == "auto" and objective.flow.s_min == 1e-5
    assert objective.flow.timestep_sampling == "logit_normal"
    x0 = torch.randn(6, 4, 3, 2, 2)
    a, b = objective.draw(x0, step_generator(0, 7, 1)), objective.draw(x0, step_generator(0, 7, 1))
    # the same key, the same draws
    assert a.extras["conditions"] == b.extras["conditions"] and torch.equal(a.noise, b.noise)
    assert a.model_kwargs["cond"].shape == (6, 5, 3, 2, 2)
    with pytest.raises(FrameloomError, match="cond_embed"):
        build_objective(
            load_config(None, ["model.family=opensora2", "model.config={condition_config: {t2v: 1}}"])
        )
    with pytest.raises(FrameloomError, match="unknown kind"):
        OpenSoraFlow(condition_config={"v2v_head": 1})


def test_motion_score_caption_rule():
    row = {"text": "a cat", "fps": 24.0, "score_vmafmotion": 2.5}
    assert motion_score(row) == 3  # int(2.5 + 0.5)
    assert motion_score({"motion": 4.4}) == 4 and motion_score({"motion": float("nan")}) is None
    # Open-Sora's VideoTextDataset joins its suffixes into one sentence
    assert apply_caption_rules("a cat", row, motion_score_on=True) == "a cat 3 motion score."
    assert (
        apply_caption_rules("a cat", row, fps_suffix_on=True, motion_score_on=True)
        == "a cat 24 FPS, 3 motion score."
    )
    assert apply_caption_rules("a cat", row, fps_suffix_on=True) == "a cat 24 FPS."  # unchanged rule
    assert apply_caption_rules("a cat", {"text": "a cat"}, motion_score_on=True) == "a cat"  # no score
    assert apply_caption_rules("", row, motion_score_on=True) == ""  # the empty prompt stays empty
    rules = CaptionRules(motion_score=True)
    assert rules.active and row_caption(row, rules) == "a cat 3 motion score."
    cfg = load_config(None, ["data.caption_motion_score=true"])
    from frameloom.pipeline import caption_rules

    assert caption_rules(cfg).motion_score
