"""Sampling from a run: one mp4 per prompt and seed, deterministic, EMA by default; the quickstart path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.sampling.video_io import read_mp4
from frameloom.train.trainer import train
from tiny import TINY

OVERRIDES = [*TINY, "train.steps=4", "sample.steps=3", "sample.fps=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    synthetic.write_synthetic_set(root / "data", num_clips=8, height=8, width=8, num_frames=4, progress=False)
    cfg = load_config(
        None, [*OVERRIDES, f"data.manifest={root / 'data' / 'manifest.parquet'}", f"run_dir={root / 'run'}"]
    )
    train(cfg)
    return root / "run"


def test_sample_writes_one_mp4_per_prompt_and_seed(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sample", str(run_dir), "--prompt", "a red square moving left", "a blue circle moving up",
                 "--seed", "0", "1", "--out", str(out), "--steps", "2"])  # fmt: skip
    assert code == 0
    files = sorted(out.glob("*.mp4"))
    assert len(files) == 4
    assert [f.name for f in files][0] == "000-a_red_square_moving_left-seed0.mp4"
    video = read_mp4(files[0])
    assert video.shape == (4, 8, 8, 3)
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(f) for f in files)


def test_sample_is_deterministic_and_seed_dependent(run_dir, tmp_path):
    for name in ("a", "b"):
        assert main(["sample", str(run_dir), "--prompt", "a red square moving left", "--seed", "3", "4",
                     "--out", str(tmp_path / name)]) == 0  # fmt: skip
    a = [read_mp4(p) for p in sorted((tmp_path / "a").glob("*.mp4"))]
    b = [read_mp4(p) for p in sorted((tmp_path / "b").glob("*.mp4"))]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])


def test_sample_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_end_to_end_small(tmp_path, capsys):
    """The quickstart's whole path on a small budget (the real recipe's accuracy is measured by hand)."""
    from frameloom.quickstart import run_quickstart

    code = run_quickstart(
        tmp_path, overrides=["train.steps=3", "train.batch_size=8", "sample.steps=2"], num_clips=32
    )
    assert code == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 32
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 32
    out = capsys.readouterr().out
    assert "color accuracy" in out and "direction accuracy" in out


def test_sample_a_config_without_a_run_uses_model_pretrained(run_dir, tmp_path):
    """A config naming released weights (model.pretrained) samples them before any training; the same
    weights inside a run's checkpoint give the same video. Without pretrained, the missing run is an error."""
    import yaml

    from frameloom.checkpoint import io as ckpt
    from frameloom.sampling.generate import load_for_sampling

    cfg = load_config(run_dir / "config.resolved.yaml")
    weights = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["model"]
    from frameloom.models.dit.family import build_denoiser
    from frameloom.pipeline import load_codec, load_text_encoder

    codec, encoder = load_codec(cfg), load_text_encoder(cfg)
    model = build_denoiser(cfg.model, codec.latent_channels, encoder.dim)
    model.load_state_dict(weights)
    model.save_pretrained(tmp_path / "released")
    config = tmp_path / "released.yaml"
    raw = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "never_trained")
    raw["model"]["pretrained"] = str(tmp_path / "released")
    raw["sample"]["use_ema"] = False
    config.write_text(yaml.safe_dump(raw))
    loaded = load_for_sampling(load_config(config), "latest", "cpu", codec=codec, text_encoder=encoder)
    for name, value in loaded.state_dict().items():
        assert np.array_equal(value.numpy(), weights[name].numpy()), name
    assert (
        main(["sample", str(config), "--prompt", "a red square moving left", "--out", str(tmp_path / "p")])
        == 0
    )
    assert main(["sample", str(run_dir), "--prompt", "a red square moving left", "--out", str(tmp_path / "r"),
                 "sample.use_ema=false"]) == 0  # fmt: skip
    (a,), (b,) = sorted((tmp_path / "p").glob("*.mp4")), sorted((tmp_path / "r").glob("*.mp4"))
    assert np.array_equal(read_mp4(a), read_mp4(b))
    raw["model"]["pretrained"] = None
    config.write_text(yaml.safe_dump(raw))
    assert main(["sample", str(config), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
