"""Pyramid Flow end to end: each preset, shrunk by overrides (tiny transformer, tiny VAE and text encoders built
on the spot), caches, trains a few steps and samples an mp4; `frameloom sample` (text and image to video) and
`frameloom export --format native` on the trained run; the family's config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.models.pyramid_flow.family import build_objective, load_denoiser
from frameloom.pipeline import run_cache
from frameloom.sampling.generate import generate_to_files
from frameloom.sampling.video_io import read_mp4
from frameloom.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MINIFLUX = (
    "model.config={num_layers: 1, num_single_layers: 1, attention_head_dim: 8, num_attention_heads: 2, "
    "pooled_projection_dim: 32, axes_dims_rope: [2, 2, 4]}"
)
TINY_SD3 = (
    "model.config={variant: sd3, sample_size: 8, num_layers: 2, attention_head_dim: 8, num_attention_heads: 2, "
    "caption_projection_dim: 16, pooled_projection_dim: 96, pos_embed_max_size: 8}"
)


def shrunk(preset: str, data: Path, run_dir: Path, *extra: str):
    """A preset with the tiny models, 25 frames of 64 x 64 (4 latent frames of 8 x 8), one process."""
    tiny = TINY_SD3 if "sd3" in preset else TINY_MINIFLUX
    return load_config(
        CONFIGS / preset,
        [
            f"data.manifest={data}",
            f"run_dir={run_dir}",
            "data.num_frames=25",
            "data.height=64",
            "data.width=64",
            "data.num_workers=0",
            "data.latent_multiple=1",
            "model.preset=null",
            tiny,
            "model.codec=tiny-pyramid",
            "model.text_encoder=tiny-pyramid",
            "model.text_max_length=16",
            "model.encoder_dtype=float32",
            "objective.pyramid.max_latent_frames=4",
            "parallel.video_sync_group=1",
            "train.steps=2",
            "train.progress=false",
            "optim.warmup_steps=0",
            "checkpoint.every=0",
            "logging.tensorboard=false",
            "sample.pyramid.first_frame_steps=[1, 1, 1]",
            "sample.pyramid.video_steps=[1, 1, 1]",
            "sample.fps=8",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyramid_data")
    synthetic.write_synthetic_set(
        root, num_clips=8, seed=0, height=64, width=64, num_frames=25, progress=False
    )
    return root / "manifest.parquet"


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        "pyramid_flow_miniflux_384p.yaml",
        "pyramid_flow_miniflux_768p.yaml",
        "pyramid_flow_miniflux_ar.yaml",
        "pyramid_flow_sd3_384p.yaml",
    ],
)
def test_preset_shrunk_trains_and_samples(dataset, tmp_path, preset):
    cfg = shrunk(preset, dataset, tmp_path / "run")
    report = run_cache(cfg, progress=False)
    assert report.failed == [] and report.encoded + report.reused == 8  # reused: the same tiny VAE
    trainer = Trainer(cfg)
    assert trainer.cached  # trains from the pre-extracted latents and text: no VAE, no text encoder
    result = trainer.fit()
    assert result.step == 2 and all(np.isfinite(result.losses))
    if "768p" in preset:
        assert trainer.par.checkpointed_blocks == 2  # the guide's gradient checkpointing
    paths = generate_to_files(
        trainer.model, *trainer._encoders(), cfg, ["a red square moving left"], out_dir=tmp_path / "s"
    )
    video = read_mp4(paths[0])
    assert video.shape == (25, 64, 64, 3)


@pytest.fixture(scope="module")
def ar_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ar") / "run"
    cfg = shrunk("pyramid_flow_miniflux_ar.yaml", dataset, run_dir, "train.ema_decay=0.9")
    run_cache(cfg, progress=False)
    Trainer(cfg).fit()
    return run_dir


@pytest.mark.slow
def test_sample_command_text_and_image_to_video(ar_run, tmp_path):
    from PIL import Image

    out = tmp_path / "t2v"
    assert (
        main(
            ["sample", str(ar_run), "--prompt", "a red square moving left", "--seed", "0", "--out", str(out)]
        )
        == 0
    )
    assert read_mp4(next(out.glob("*.mp4"))).shape == (25, 64, 64, 3)
    # image to video: the first frame is the image (through the VAE), the rest generated after it
    image = tmp_path / "first.png"
    Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(image)
    i2v = tmp_path / "i2v"
    assert main(["sample", str(ar_run), "--prompt", "x", "--image", str(image), "--out", str(i2v)]) == 0
    assert read_mp4(next(i2v.glob("*.mp4"))).shape == (25, 64, 64, 3)


@pytest.mark.slow
def test_export_native_writes_the_released_layout(ar_run, tmp_path):
    out = tmp_path / "diffusion_transformer_384p"
    assert main(["export", str(ar_run), "--format", "native", "--out", str(out)]) == 0
    model = load_denoiser(out)
    from frameloom.checkpoint import io as ckpt

    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(ar_run))
    weights = {**loaded["model"], **loaded["ema"]}  # export uses the EMA weights, as sampling does
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_config_errors_are_one_line(tmp_path):
    base = CONFIGS / "pyramid_flow_miniflux_ar.yaml"
    with pytest.raises(FrameloomError, match="multiple of 4"):
        build_objective(load_config(base, ["train.batch_size=6"]))
    with pytest.raises(FrameloomError, match="does not divide the 16 latent units"):
        build_objective(load_config(base, ["parallel.video_sync_group=5"]))
    with pytest.raises(FrameloomError, match="video_sync_group > 1 needs objective.name=pyramid_flow_ar"):
        build_objective(
            load_config(CONFIGS / "pyramid_flow_miniflux_384p.yaml", ["parallel.video_sync_group=2"])
        )
    with pytest.raises(FrameloomError, match="not available for model.family pyramid_flow"):
        build_objective(load_config(base, ["objective.name=ddpm"]))
    with pytest.raises(FrameloomError, match="unknown sample.pyramid key"):
        from frameloom.sampling.pyramid import PyramidSampleOptions

        PyramidSampleOptions.from_dict({"video_step": [1]})


@pytest.mark.slow
def test_cache_writes_files_pyramid_flow_reads(ar_run, dataset, tmp_path):
    import json

    from frameloom.cache.dataset import CachedClipDataset
    from frameloom.data.dialects.pyramid import read_pyramid
    from frameloom.models.pyramid_flow.files import read_latent, read_text_fea
    from frameloom.pipeline import (
        bucket_policy,
        caption_rules,
        clip_spec,
        load_codec,
        load_text_encoder,
        open_store,
    )

    cfg = shrunk("pyramid_flow_miniflux_ar.yaml", dataset, ar_run)
    out = tmp_path / "pyramid" / "video_text.jsonl"
    assert (
        main(
            [
                "cache",
                str(CONFIGS / "pyramid_flow_miniflux_ar.yaml"),
                *_overrides(cfg),
                "--pyramid-jsonl",
                str(out),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and set(records[0]) == {"video", "text", "latent", "text_fea"}
    # what Pyramid Flow's dataset loads: a raw (1, 16, T, h, w) latent and the three text tensors
    raw = torch.load(out.parent / records[0]["latent"], weights_only=True)
    assert raw.shape == (1, 16, 4, 8, 8) and raw.dtype == torch.bfloat16
    fea = torch.load(out.parent / records[0]["text_fea"], weights_only=True)
    assert fea["prompt_embed"].shape == (1, 16, 32) and fea["pooled_prompt_embed"].shape == (1, 32)
    # read back by frameloom: the cached (normalised) latent and text, up to bf16 rounding
    codec, encoder = load_codec(cfg, "cpu"), load_text_encoder(cfg, "cpu")
    cached = CachedClipDataset(cfg.data.manifest, clip_spec(cfg), codec.identity, encoder.identity, open_store(cfg),
                               buckets=bucket_policy(cfg), caption_rules=caption_rules(cfg))[0]  # fmt: skip
    torch.testing.assert_close(
        read_latent(out.parent / records[0]["latent"], "miniflux"), cached["latent"], rtol=0.02, atol=0.02
    )
    emb, mask, extras = read_text_fea(out.parent / records[0]["text_fea"])
    torch.testing.assert_close(emb, cached["text_emb"])
    assert torch.equal(mask, cached["text_mask"])
    torch.testing.assert_close(extras["pooled"], cached["text_extras"]["pooled"])
    # and frameloom's own Pyramid Flow reader takes the jsonl back (latent / text_fea columns)
    listing = read_pyramid(out)
    assert len(listing.entries) == 8 and listing.entries[0].fields["latent"] == records[0]["latent"]
    # ... and trains from those files (data/precomputed.py): no video decoded, no text encoder loaded; the
    # empty prompt's features (caption dropout) come from text/empty.pt, written beside them
    from frameloom.data.prepare import prepare

    prepare(out, out.parent / "manifest.parquet", progress=False)
    trainer = Trainer(shrunk("pyramid_flow_miniflux_ar.yaml", out.parent / "manifest.parquet", tmp_path / "run",
                             "data.empty_text_fea=text/empty.pt"))  # fmt: skip
    assert trainer.precomputed and trainer.cached and trainer.text_encoder is None
    empty_emb, empty_mask = encoder.encode([""])
    torch.testing.assert_close(trainer.empty_emb, empty_emb[0, : int(empty_mask[0].sum())].float())
    torch.testing.assert_close(trainer.empty_extras["pooled"], encoder.encode_extras([""])["pooled"][0])
    result = trainer.fit()
    assert result.step == 2 and all(np.isfinite(result.losses))


def _overrides(cfg) -> list[str]:
    """The shrunk preset's overrides again, as command-line arguments."""
    return [
        f"data.manifest={cfg.data.manifest}",
        f"run_dir={cfg.run_dir}",
        "data.num_frames=25",
        "data.height=64",
        "data.width=64",
        "data.latent_multiple=1",
        "model.preset=null",
        TINY_MINIFLUX,
        "model.codec=tiny-pyramid",
        "model.text_encoder=tiny-pyramid",
        "model.text_max_length=16",
        "model.encoder_dtype=float32",
        "parallel.video_sync_group=1",
    ]
