"""The `ltx_video` family on a tiny random diffusers directory: token packing and latent normalization
against diffusers' LTX pipeline code, the resolution-dependent shift and the loss by hand, LoRA and full
training through `train(cfg)`, export, and frameloom's sampling against `LTXPipeline` with the exported
weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from families import (
    LTX_CLIP,
    assert_full_run_exports,
    assert_lora_trained_only_the_adapter,
    assert_pipeline_text_matches_prompt_strings,
    build_tiny_ltx,
    family_config,
)
from frameloom import pipeline as pl
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.export import export_run, load_run_denoiser
from frameloom.models.ltx_video.adapter import pack_latents, unpack_latents
from frameloom.models.ltx_video.family import sample_latents, sample_videos
from frameloom.models.registry import get_family
from frameloom.train.trainer import train

TEXT_LEN = 16  # model.text_max_length of the tiny runs (LTX-Video's pipeline: 128)
GRID = (2, 8, 8)  # latent (T, H, W) of a 5 x 32 x 32 clip: time /4, space /4
#: frameloom's sample vs LTXPipeline, float32 on CPU: both run [uncond; cond] as one batch, so the latents
#: agree to the last bit in practice; decoded videos differ by ~1e-6 (VAE normalization order).
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("ltx") / "model")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic_set(root, num_clips=4, seed=0, progress=False, **LTX_CLIP)
    return root / "manifest.parquet"


def ltx_cfg(pretrained: Path, manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        family_config(
            "ltx_video",
            pretrained,
            manifest,
            run_dir,
            *(f"data.{k}={v}" for k, v in LTX_CLIP.items()),
            f"model.text_max_length={TEXT_LEN}",
            *extra,
        ),
    )


@pytest.fixture(scope="module")
def lora_run(ltx_dir, manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "lora"
    validate = ("validation.every=2", "validation.prompts=[a red ball]")  # LTXPipeline around the weights
    result = train(ltx_cfg(ltx_dir, manifest, run, "model.lora.rank=4", "optim.lr=1e-2", *validate))
    return run, result


# ------------------------------------------------------------------------------------------------ layout


def test_packing_is_the_pipelines():
    from diffusers import LTXPipeline

    x = torch.randn(2, 3, 4, 6, 8)
    for p, p_t in ((1, 1), (2, 1), (2, 2)):
        tokens = pack_latents(x, p, p_t)
        torch.testing.assert_close(tokens, LTXPipeline._pack_latents(x, p, p_t), atol=0, rtol=0)
        grid = (4 // p_t, 6 // p, 8 // p)
        assert torch.equal(unpack_latents(tokens, grid, p, p_t), x)
        torch.testing.assert_close(
            LTXPipeline._unpack_latents(tokens, *grid, p, p_t), unpack_latents(tokens, grid, p, p_t)
        )


def test_codec_normalizes_as_the_pipeline(ltx_dir, manifest, tmp_path):
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    codec = get_family("ltx_video").load_codec(ltx_cfg(ltx_dir, manifest, tmp_path), torch.device("cpu"))
    vae = AutoencoderKLLTXVideo.from_pretrained(ltx_dir, subfolder="vae")
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw = vae.encode(video).latent_dist.mode()
    # (z - mean) * scaling_factor / std with the tiny VAE's non-trivial buffers and scaling factor 1.5
    ref = LTXPipeline._normalize_latents(raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(codec.encode(video), ref, atol=1e-5, rtol=1e-5)
    assert codec.latent_size(5, 32, 32) == GRID


def test_text_matches_the_pipelines_prompt_embeddings(ltx_dir, manifest, tmp_path):
    from diffusers import LTXPipeline

    cfg = ltx_cfg(ltx_dir, manifest, tmp_path)
    encoder = pl.load_text_encoder(cfg, "cpu")
    emb, mask = encoder.encode(["a red ball"])
    pipe = LTXPipeline.from_pretrained(ltx_dir)
    ref, ref_mask, _, _ = pipe.encode_prompt(
        "a red ball", do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN
    )
    assert torch.equal(mask, ref_mask)
    n = int(mask.sum())  # the real tokens (T5 ran unmasked over the padded ids, as in the pipeline)
    torch.testing.assert_close(emb[:, :n], ref[:, :n], atol=1e-6, rtol=0)
    # Validation hands the pipeline these embeddings with zeroed padding and the mask: the masked positions
    # never reach the output, so the video is the one the pipeline makes from the string.
    model = get_family("ltx_video").build_denoiser(cfg.model, 0, 0)
    assert_pipeline_text_matches_prompt_strings(
        pipe, model, encoder, "a red ball", **LTX_CLIP, num_inference_steps=2, max_sequence_length=TEXT_LEN
    )


# ------------------------------------------------------------------------------------------------ loss


def test_shift_and_loss_match_the_formula_by_hand(ltx_dir, manifest, tmp_path):
    from diffusers import LTXPipeline

    cfg = ltx_cfg(ltx_dir, manifest, tmp_path, "model.config={first_frame_conditioning_p: 0.0}")
    family = get_family("ltx_video")
    objective = family.build_objective(cfg)
    # mu for 2 x 8 x 8 = 128 tokens on LTX-Video's line (1024 -> 0.95, 4096 -> 2.05):
    # m = 1.1 / 3072, b = 0.95 - 1024 m = 0.583333; mu = 128 m + b = 0.629167; shift e^mu = 1.876019.
    assert objective.flow.mu(GRID) == pytest.approx(0.6291667, abs=1e-6)
    assert objective.flow.resolve_shift(GRID) == pytest.approx(math.exp(0.6291667), abs=1e-5)

    model = family.build_denoiser(cfg.model, 8, 32).eval()
    x0 = torch.randn(2, 8, *GRID, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    inputs = objective.draw(x0, torch.Generator().manual_seed(3))
    assert inputs.model_kwargs == {"frame_rate": 25.0}  # no data.target_fps / model.config.frame_rate
    with torch.no_grad():
        loss = objective.loss(model(inputs.x_t, inputs.t, emb, mask, **inputs.model_kwargs), inputs)

        # By hand: LTX-Video's trainer draws t = sigmoid(N(mu, 1)), which is logit-normal(0, 1) shifted by
        # e^mu; noise after t; x_t = (1 - t) x0 + t noise; the transformer takes the pipeline's packed tokens,
        # timestep 1000 t, the text with its mask, and RoPE scale (4 / 25, 4, 4); target noise - x0.
        g = torch.Generator().manual_seed(3)
        t = torch.sigmoid(torch.randn(2, generator=g) + 0.6291667)
        noise = torch.randn(x0.shape, generator=g)
        tt = t.view(2, 1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        out = model.transformer(
            hidden_states=LTXPipeline._pack_latents(x_t),
            encoder_hidden_states=emb,
            timestep=1000 * t,
            encoder_attention_mask=mask.float(),
            num_frames=GRID[0],
            height=GRID[1],
            width=GRID[2],
            rope_interpolation_scale=(4 / 25, 4, 4),
        ).sample
        v = LTXPipeline._unpack_latents(out, *GRID)
        expected = ((v - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(inputs.t, t, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ training


def test_lora_steps_train_only_the_adapter(lora_run, ltx_dir):
    from diffusers import LTXVideoTransformer3DModel

    run, result = lora_run
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    _, model, _ = load_run_denoiser(run)
    base = LTXVideoTransformer3DModel.from_pretrained(ltx_dir, subfolder="transformer").state_dict()
    assert_lora_trained_only_the_adapter(model.transformer.state_dict(), base)
    assert len(list((run / "samples" / "step-00000002").glob("*.mp4"))) == 1  # validation via LTXPipeline


@pytest.mark.slow
def test_full_steps_and_diffusers_export(ltx_dir, manifest, tmp_path):
    from diffusers import LTXPipeline

    run = tmp_path / "full"
    result = train(ltx_cfg(ltx_dir, manifest, run, "model.lora.rank=0"))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert_full_run_exports(run, ltx_dir, LTXPipeline, tmp_path / "export")


# ------------------------------------------------------------------------------------------------ export + parity


def test_lora_export_loads_in_the_pipeline_and_matches_frameloom_sampling(lora_run, ltx_dir, tmp_path):
    from diffusers import LTXPipeline

    run, _ = lora_run
    export_run(run, fmt="lora", out=tmp_path / "lora", comfyui=True, dtype="fp32")
    cfg, model, _ = load_run_denoiser(run)
    encoder, codec = pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu")
    ours = sample_latents(model, encoder, codec, cfg, ["a red ball"], [7])

    pipe = LTXPipeline.from_pretrained(ltx_dir)
    kw = dict(
        prompt="a red ball",
        num_frames=LTX_CLIP["num_frames"],
        height=LTX_CLIP["height"],
        width=LTX_CLIP["width"],
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=TEXT_LEN,
    )

    def run_pipe(output_type: str):
        return pipe(**kw, output_type=output_type, generator=torch.Generator().manual_seed(7)).frames

    base = unpack_latents(run_pipe("latent"), GRID)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    with_lora = unpack_latents(run_pipe("latent"), GRID)
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA changes the pipeline's output
    torch.testing.assert_close(ours, with_lora, atol=PARITY_ATOL, rtol=0)
    video = run_pipe("pt")[0].permute(1, 0, 2, 3) * 2 - 1  # (3, T, H, W) in [-1, 1]
    ours_video = sample_videos(model, encoder, codec, cfg, ["a red ball"], [7])[0]
    torch.testing.assert_close(ours_video, video, atol=PARITY_ATOL, rtol=0)

    # ComfyUI form: LTX-Video's module names are diffusers' names; every key names a module of the model.
    comfy = load_file(str(tmp_path / "lora" / "lora_comfyui.safetensors"))
    modules = {k.rpartition(".")[0] for k in model.transformer.state_dict()}
    for key in comfy:
        assert key.startswith("diffusion_model.")
        module = key.removeprefix("diffusion_model.").rsplit(".", 2 if "lora_" in key else 1)[0]
        assert f"{module}.base_layer" in modules, key


# ------------------------------------------------------------------------------------------------ I2V


def test_first_frame_conditioning_by_hand(ltx_dir, manifest, tmp_path):
    """With probability p a sample's first latent frame stays clean at time 0 and leaves the loss (as
    LTXImageToVideoPipeline samples); the other samples train text-to-video."""
    from diffusers import LTXPipeline

    cfg = ltx_cfg(ltx_dir, manifest, tmp_path, "model.config={first_frame_conditioning_p: 0.5}")
    family = get_family("ltx_video")
    objective = family.build_objective(cfg)
    model = family.build_denoiser(cfg.model, 8, 32).eval()
    x0 = torch.randn(4, 8, *GRID, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, 3, dtype=torch.bool)
    inputs = objective.draw(x0, torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = objective.loss(model(inputs.x_t, inputs.t, emb, mask, **inputs.model_kwargs), inputs)

        # By hand: t = sigmoid(N(mu, 1)), noise, then one uniform per sample: < 0.5 conditions on frame 0.
        g = torch.Generator().manual_seed(5)
        t = torch.sigmoid(torch.randn(4, generator=g) + 0.6291667)
        noise = torch.randn(x0.shape, generator=g)
        first = torch.rand(4, generator=g) < 0.5
        assert first.tolist() == [False, True, False, False]  # both kinds in this batch
        x_t = (1 - t.view(4, 1, 1, 1, 1)) * x0 + t.view(4, 1, 1, 1, 1) * noise
        x_t[first, :, 0] = x0[first, :, 0]
        frame_t = t[:, None].repeat(1, GRID[0])
        frame_t[first, 0] = 0
        tokens = GRID[1] * GRID[2]
        timestep = (1000 * frame_t).repeat_interleave(tokens, dim=1)  # (B, T H W): frame 0's tokens first
        out = model.transformer(
            hidden_states=LTXPipeline._pack_latents(x_t),
            encoder_hidden_states=emb,
            timestep=timestep,
            encoder_attention_mask=mask.float(),
            num_frames=GRID[0],
            height=GRID[1],
            width=GRID[2],
            rope_interpolation_scale=(4 / 25, 4, 4),
        ).sample
        err = ((LTXPipeline._unpack_latents(out, *GRID) - (noise - x0)) ** 2).mean(dim=(1, 3, 4))  # (B, T)
        per_sample = torch.where(first, err[:, 1:].mean(dim=1), err.mean(dim=1))
        expected = per_sample.mean()
    torch.testing.assert_close(inputs.x_t, x_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(inputs.t, frame_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_image_to_video_sampling_equals_the_i2v_pipeline(manifest, tmp_path):
    """`frameloom sample --image` on an LTX-Video run equals LTXImageToVideoPipeline (image latent drawn
    before the noise, frame 0 at time 0 and never stepped), and validation with first frames goes through
    that pipeline. (The I2V pipeline normalizes the image latent without the VAE's scaling factor: equal to
    frameloom's codec for LTX-Video's scaling_factor 1.0, the released value; the tiny model uses it here.)"""
    from diffusers import LTXImageToVideoPipeline

    from families import solid_image
    from frameloom.models.ltx_video.family import validate

    pre = build_tiny_ltx(tmp_path / "ltx", scaling_factor=1.0)
    image_path = solid_image(tmp_path / "first.png", 32, 90)
    cfg = ltx_cfg(pre, manifest, tmp_path, f"sample.image={image_path}", "sample.negative_prompt=blurry")
    model = get_family("ltx_video").build_denoiser(cfg.model, 0, 0).eval()
    encoder, codec = pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu")
    ours = sample_latents(model, encoder, codec, cfg, ["a red ball"], [7])

    pipe = LTXImageToVideoPipeline.from_pretrained(pre)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        image=torch.full((1, 3, 32, 32), 90 / 255),
        prompt="a red ball",
        negative_prompt="blurry",
        num_frames=LTX_CLIP["num_frames"],
        height=LTX_CLIP["height"],
        width=LTX_CLIP["width"],
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=TEXT_LEN,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
    ).frames
    torch.testing.assert_close(ours, unpack_latents(theirs, GRID), atol=PARITY_ATOL, rtol=0)
    paths = validate(
        model, encoder, codec, ltx_cfg(pre, manifest, tmp_path, "validation.prompts=[a cat]", f"sample.image={image_path}"), tmp_path / "val"
    )  # fmt: skip
    assert len(paths) == 1 and paths[0].stat().st_size > 0


def test_frame_rates_per_clip_and_from_the_data(ltx_dir, manifest, tmp_path):
    """The fallback rate of clips with no rate of their own: data.target_fps when set (model.config.frame_rate
    wins); and a batch may carry one rate per clip (B,): each sample as if alone at its own rate
    (test_ltx_frame_rates.py: the per-clip rates from the data)."""
    from frameloom.models.ltx_video.family import clip_frame_rate

    assert clip_frame_rate(ltx_cfg(ltx_dir, manifest, tmp_path)) == 25.0
    assert clip_frame_rate(ltx_cfg(ltx_dir, manifest, tmp_path, "data.target_fps=12")) == 12.0
    both = ltx_cfg(ltx_dir, manifest, tmp_path, "data.target_fps=12", "model.config={frame_rate: 30}")
    assert clip_frame_rate(both) == 30.0
    model = get_family("ltx_video").build_denoiser(both.model, 0, 0).eval()
    x = torch.randn(2, 8, *GRID, generator=torch.Generator().manual_seed(0))
    emb, mask = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        batched = model(x, t, emb, mask, frame_rate=torch.tensor([25.0, 12.0]))
        alone = [model(x[i : i + 1], t[i : i + 1], emb[i : i + 1], mask[i : i + 1], frame_rate=r) for i, r in enumerate((25.0, 12.0))]  # fmt: skip
        other = model(x[:1], t[:1], emb[:1], mask[:1], frame_rate=12.0)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=0)
    assert (other - alone[0]).abs().max() > 1e-3  # the rate matters
