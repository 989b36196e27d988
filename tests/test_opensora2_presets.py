"""Each Open-Sora 2.0 preset, shrunk by overrides (tiny MMDiT, VAE or DC-AE, T5 and CLIP; 32 x 32 clips in one
bucket), trains a few steps on a bucketed Open-Sora CSV and samples an mp4 with ``frameloom sample``; the i2v
preset samples from an image and resumes bit-exactly (conditions, noise and sampler position); the 256px run
exports in the released layout. Slow: about a minute on 2 busy cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frameloom.checkpoint import io as ckpt
from frameloom.cli import main
from frameloom.config import load_config
from frameloom.models.opensora2.family import load_denoiser
from frameloom.train.trainer import Trainer
from opensora2_tiny import DCAE, MMDIT, TEXT, build_dc_ae, build_vae, write_csv

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("256px", "768px", "i2v", "high_compression")


def shrink(root: Path, csv: Path, preset: str, *extra: str) -> list[str]:
    """Overrides that turn a preset into a CPU-sized run (everything else: the preset's recipe)."""
    dc_ae = preset == "high_compression"
    frames = 4 if dc_ae else 5  # the DC-AE takes multiples of 4, the causal VAE 4k + 1
    autoencoder = (
        f", autoencoder_config: {{{', '.join(f'{k}: {v}' for k, v in DCAE.items())}}}" if dc_ae else ""
    )
    return [
        "model.preset=null",
        "model.pretrained=null",
        f"model.codec={build_dc_ae(root) if dc_ae else build_vae(root)}",
        "model.text_encoder=tiny-byt5",
        "model.text_max_length=16",
        "model.encoder_dtype=float32",
        "model.vae_tiling=false",
        f"model.config={MMDIT}, {TEXT}{autoencoder}}}",
        f"data.manifest={csv}",
        f"data.bucket_config={{_delete_: true, 32px: {{{frames}: [1.0, 2]}}}}",
        f"data.num_frames={frames}",
        "data.height=32",
        "data.width=32",
        "data.num_workers=0",
        "data.require_cache=false",  # the preset refuses to start without a complete cache; these decode
        "parallel.sp_size=1",
        "train.steps=2",
        "train.progress=false",
        "logging.tensorboard=false",
        "checkpoint.every=0",
        "sample.steps=2",
        f"run_dir={root / 'runs' / preset}",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("os2_presets")
    return root, write_csv(root, num_clips=4, size=32, frames=9)


@pytest.fixture(scope="module")
def trained(data):
    """preset -> (its run folder, its 2-step TrainResult), each trained once for the module."""
    root, csv = data
    runs = {}

    def train(preset: str):
        if preset not in runs:
            trainer = Trainer(load_config(CONFIGS / f"opensora2_{preset}.yaml", shrink(root, csv, preset)))
            assert trainer.policy is not None and type(trainer.objective).__name__ == "OpenSoraFlow"
            assert trainer.par.checkpointed_blocks == 2  # (8, 100) / (100, 100) on the 1 + 1 tiny blocks
            runs[preset] = (root / "runs" / preset, trainer.fit())
        return runs[preset]

    return train


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_on_a_bucketed_csv_and_samples(trained, preset, tmp_path):
    run, result = trained(preset)
    assert result.step == 2 and all(np.isfinite(result.losses))
    args = [
        "sample",
        str(run),
        "--prompt",
        "a red ball 24 FPS, 3 motion score.",
        "--seed",
        "0",
        "--out",
        str(tmp_path),
    ]
    if preset in ("i2v", "high_compression"):
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "first.png")
        args += ["--image", str(tmp_path / "first.png")]
    assert main(args) == 0
    assert len(list(tmp_path.glob("*.mp4"))) == 1
    if preset == "256px":  # the released layout, loaded back by frameloom (strictly)
        out = tmp_path / "export"
        assert main(["export", str(run), "--format", "native", "--out", str(out)]) == 0
        model = load_denoiser(out)
        weights = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]
        assert (out / "Open_Sora_v2.safetensors").is_file() and set(model.state_dict()) == set(weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.slow
def test_frameloom_cache_pre_extracts_latents_and_pooled_text(data, trained):
    root, csv = data
    _, fly = trained("256px")  # decoded and encoded on the fly
    extra = shrink(root, csv, "256px", f"run_dir={root / 'runs' / 'cached'}", "train.steps=1")
    config = CONFIGS / "opensora2_256px.yaml"
    assert main(["cache", str(config), *extra]) == 0
    trainer = Trainer(load_config(config, extra))
    assert trainer.cached and trainer.codec is None  # trains from latents + T5 tokens + CLIP pooled only
    # the same step from the cache: the same loss (same batch, draws, latents and text)
    assert trainer.fit().losses[0] == pytest.approx(fly.losses[0], rel=1e-5)
    batch = next(iter(trainer._loader()))  # (after fit: iterating moves the sampler on)
    assert batch["text_extras"]["pooled"].shape == (2, 16) and batch["text_emb"].shape == (2, 16, 32)


@pytest.mark.slow
def test_i2v_preset_resumes_bit_exactly(data, trained):
    root, csv = data
    run, first = trained("i2v")  # 2 steps, checkpointed at the end

    def cfg(run_dir: Path, *extra: str):
        return load_config(
            CONFIGS / "opensora2_i2v.yaml", shrink(root, csv, "i2v", f"run_dir={run_dir}", *extra)
        )

    straight = Trainer(cfg(root / "runs" / "straight", "train.steps=3")).fit()
    resumed = Trainer(cfg(run, "train.steps=3", "checkpoint.resume=latest")).fit()
    # same conditions, times, noise, dropout and batches, before and after the resume
    assert first.losses + resumed.losses == straight.losses
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "runs" / "straight"))["model"]
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
