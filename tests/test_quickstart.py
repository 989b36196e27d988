"""The quickstart's report over seeds (scores.json and the screen table) and its command line."""

from __future__ import annotations

import math

import pytest

from frameloom import quickstart as Q
from frameloom.cli import main


def _set(color: float, direction: float, shape: float) -> dict:
    return {"color_accuracy": color, "direction_accuracy": direction, "shape_accuracy": shape, "n": 32}


PER_SEED = {
    "0": {"a": _set(1.0, 0.9375, 0.625), "b": _set(0.875, 0.5, 0.25), "minutes": 6.0},
    "1": {"a": _set(0.9375, 0.9375, 0.5), "b": _set(0.9375, 0.75, 0.375), "minutes": 7.0},
    "2": {"a": _set(0.875, 1.0, 0.75), "b": _set(1.0, 1.0, 0.5), "minutes": 8.0},
}


def test_report_has_mean_spread_and_targets():
    report = Q.quickstart_report(PER_SEED, "test")
    assert report["seeds"] == [0, 1, 2] and report["per_seed"] is PER_SEED
    color_a = report["summary"]["a"]["color"]
    # mean of 1, 0.9375, 0.875 = 0.9375; population std = 0.0625 * sqrt(2 / 3)
    assert color_a["mean"] == pytest.approx(0.9375)
    assert color_a["std"] == pytest.approx(0.0625 * math.sqrt(2 / 3))
    assert (color_a["min"], color_a["max"]) == (0.875, 1.0)
    assert color_a["target"] == 0.95 and color_a["seeds_meeting_target"] == 1  # only seed 0 has >= 95%
    direction_b = report["summary"]["b"]["direction"]
    assert direction_b["mean"] == pytest.approx(0.75) and direction_b["seeds_meeting_target"] == 1
    assert "target" not in report["summary"]["b"]["shape"]  # shape is targeted on set (a) only
    assert report["minutes"]["mean"] == pytest.approx(7.0)
    assert report["chance"] == {"color": 1 / 6, "direction": 1 / 4, "shape": 1 / 4}


def test_screen_table():
    text = Q.format_report(Q.quickstart_report(PER_SEED, "validation"))
    lines = text.splitlines()
    assert lines[0] == "quickstart scores (validation prompts)"
    row = next(line for line in lines if line.startswith("(a) color"))
    # per seed, then mean and std (0.0510 -> 5.1%), then the target
    assert row.split() == ["(a)", "color", "100.0%", "93.8%", "87.5%", "93.8%", "5.1%", ">=", "95%"]
    row = next(line for line in lines if line.startswith("(b) shape"))
    assert row.split()[-1] == "-"
    assert "7.0 min per seed" in lines[-1]


def test_cli_seeds_and_overrides(monkeypatch):
    calls = []
    monkeypatch.setattr(Q, "run_quickstart", lambda out, **kw: calls.append((out, kw)) or 0)
    assert main(["quickstart", "--seeds", "0", "1", "2", "train.steps=5", "--out", "o"]) == 0
    assert main(["quickstart", "sample.steps=2", "--eval", "validation"]) == 0
    assert calls[0] == ("o", {"overrides": ["train.steps=5"], "seeds": [0, 1, 2], "evaluate": "test"})
    assert calls[1][1] == {"overrides": ["sample.steps=2"], "seeds": None, "evaluate": "validation"}


def test_cli_rejects_bad_seeds(capsys, monkeypatch):
    monkeypatch.setattr(Q, "run_quickstart", lambda out, **kw: 0)
    assert main(["quickstart", "--seeds", "zero"]) == 2
    assert "--seeds expects integers, got 'zero'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quickstart", "--eval", "train"])


def test_unknown_evaluation_is_one_line(tmp_path):
    with pytest.raises(Q.FrameloomError, match="unknown quickstart evaluation 'train'"):
        Q.run_quickstart(tmp_path, evaluate="train")


def test_recipe_draws_at_two_pixels_with_64_tokens():
    """The shipped recipe: 2x2-pixel tokens spanning all 8 frames of a 16x16 clip, 64 tokens in all, as many as
    the former [2, 4, 4] patches (the 10-minute budget), and objects half the frame or more (shapes of 8-10 px)."""
    from frameloom.config import load_config
    from frameloom.data import synthetic

    cfg = load_config(Q.QUICKSTART_CONFIG)
    pt, ph, pw = cfg.model.config["patch_size"]
    assert (pt, ph, pw) == (cfg.data.num_frames, 2, 2)
    tokens = (cfg.data.num_frames // pt) * (cfg.data.height // ph) * (cfg.data.width // pw)
    assert tokens == 64 == (8 // 2) * (16 // 4) * (16 // 4)
    assert synthetic.SIZE_RANGE[0] * min(cfg.data.height, cfg.data.width) >= 8
