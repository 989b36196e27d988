"""The `wan` family (Wan 2.1 T2V and I2V) on tiny random diffusers directories: schedule, text encoding,
the loss by hand, I2V conditioning against diffusers' own pipeline code, LoRA and full training through
`train(cfg)`, export, and frameloom's sampling against the diffusers pipeline with the exported weights."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from families import (
    WAN_CLIP,
    WAN_LATENTS_MEAN,
    WAN_LATENTS_STD,
    assert_full_run_exports,
    assert_lora_trained_only_the_adapter,
    assert_pipeline_text_matches_prompt_strings,
    build_tiny_wan,
    family_config,
    solid_image,
)
from frameloom import pipeline as pl
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.export import export_run, load_run_denoiser
from frameloom.models.registry import get_family
from frameloom.models.wan.adapter import fixed_length_text
from frameloom.models.wan.family import comfyui_module, sample_latents
from frameloom.models.wan.i2v import first_frame_mask, pack_image_embeds, unpack_image_embeds
from frameloom.sampling.family_sampling import flow_match_sigmas
from frameloom.train.trainer import train

TEXT_LEN = 16  # model.text_max_length of the tiny runs (Wan 2.1 itself: 512)
#: frameloom's sample vs the diffusers pipeline: float32 on CPU; measured max |diff| ~1e-6 on latents of
#: magnitude ~3 (the pipeline runs cond and uncond as two forwards, frameloom as one batch of two).
PARITY_ATOL = 1e-5
VALIDATE = (
    "validation.every=2",
    "validation.prompts=[a red ball]",
)  # the pipeline around the trained weights


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v")


@pytest.fixture(scope="module")
def wan_i2v_dir(tmp_path_factory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "i2v", i2v=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic_set(root, num_clips=4, seed=0, progress=False, **WAN_CLIP)
    return root / "manifest.parquet"


def wan_cfg(pretrained: Path, manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        family_config(
            "wan",
            pretrained,
            manifest,
            run_dir,
            *(f"data.{k}={v}" for k, v in WAN_CLIP.items()),
            f"model.text_max_length={TEXT_LEN}",
            "objective.timestep_sampling=uniform",
            *extra,
        ),
    )


@pytest.fixture(scope="module")
def lora_run(wan_dir, manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "lora"
    # lr 1e-2 so that two steps move the LoRA visibly away from B = 0
    targets = (
        "model.lora.target_modules=[to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2]"  # the preset's
    )
    result = train(
        wan_cfg(
            wan_dir,
            manifest,
            run,
            "model.lora.rank=4",
            "model.lora.alpha=8",
            targets,
            "optim.lr=1e-2",
            *VALIDATE,
        )
    )
    return run, result


# ------------------------------------------------------------------------------------------------ schedule


def test_flow_match_sigmas_equal_the_scheduler_and_hand_values():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    # 2 steps, shift 3: the training grid ends at shift(1/1000) = 3e-3 / 1.002 = 0.00299401; the inference
    # grid is linspace(1, 0.00299401, 2), shifted again: [1, 3 * 0.00299401 / (1 + 2 * 0.00299401)] =
    # [1, 0.00892857], then 0.
    sigmas = flow_match_sigmas(2, {"shift": 3.0})
    s_min = 3e-3 / 1.002
    assert sigmas.tolist() == pytest.approx([1.0, 3 * s_min / (1 + 2 * s_min), 0.0], abs=1e-7)
    for shift in (1.0, 3.0, 5.0):
        for steps in (1, 4, 50):
            scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
            scheduler.set_timesteps(steps)
            assert torch.equal(flow_match_sigmas(steps, dict(scheduler.config)), scheduler.sigmas)
    # The UniPC config the Wan 2.1 directories ship: frameloom's Euler grid uses its flow_shift.
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(10)
    assert torch.equal(flow_match_sigmas(10, dict(unipc.config)), euler.sigmas)


# ------------------------------------------------------------------------------------------------ text


def test_text_matches_the_pipelines_prompt_embeddings(wan_dir, manifest, tmp_path):
    from diffusers import WanPipeline

    cfg = wan_cfg(wan_dir, manifest, tmp_path / "run")
    encoder = pl.load_text_encoder(cfg, "cpu")
    prompt = "  a red &amp;  ball "  # Wan's cleaning: unescape, collapse whitespace, strip -> "a red & ball"
    emb, mask = encoder.encode([prompt])
    assert torch.equal(emb, encoder.encode(["a red & ball"])[0])
    pipe = WanPipeline.from_pretrained(wan_dir)
    ref, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    torch.testing.assert_close(fixed_length_text(emb, mask, TEXT_LEN), ref, atol=1e-6, rtol=0)
    # What validation hands the pipeline instead of the string gives the same video.
    model = get_family("wan").build_denoiser(cfg.model, 0, 0)
    assert_pipeline_text_matches_prompt_strings(
        pipe, model, encoder, prompt, **WAN_CLIP, num_inference_steps=2, max_sequence_length=TEXT_LEN
    )


# ------------------------------------------------------------------------------------------------ loss


def test_loss_matches_the_flow_formula_by_hand(wan_dir, manifest, tmp_path):
    cfg = wan_cfg(wan_dir, manifest, tmp_path / "run")
    family = get_family("wan")
    model = family.build_denoiser(cfg.model, 4, 32).eval()
    objective = family.build_objective(cfg)
    x0 = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    inputs = objective.draw(x0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = objective.loss(model(inputs.x_t, inputs.t, emb, mask), inputs)

        # By hand: t ~ U[0, 1) then the scheduler's shift 3: t' = 3 t / (1 + 2 t); noise after t from the
        # same generator; x_t = (1 - t') x0 + t' noise; target noise - x0; the transformer sees
        # timestep 1000 t' and the text zero-padded to TEXT_LEN without a mask; loss = mean((v - target)^2).
        g = torch.Generator().manual_seed(3)
        t = torch.rand(2, generator=g)
        t = 3 * t / (1 + 2 * t)
        noise = torch.randn(x0.shape, generator=g)
        tt = t.view(2, 1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        text = torch.zeros(2, TEXT_LEN, 32)
        text[0, :5] = emb[0]
        text[1, :3] = emb[1, :3]
        v = model.transformer(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=text).sample
        expected = ((v - (noise - x0)) ** 2).mean()
    assert torch.equal(inputs.t, t)
    torch.testing.assert_close(inputs.x_t, x_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ I2V


def test_i2v_condition_matches_the_pipeline_and_the_loss_by_hand(wan_i2v_dir, manifest, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    cfg = wan_cfg(wan_i2v_dir, manifest, tmp_path / "run")
    family = get_family("wan")
    codec = family.load_codec(cfg, torch.device("cpu"))
    model = family.build_denoiser(cfg.model, 4, 32).eval()
    objective = family.build_objective(cfg)
    u8 = torch.randint(
        0, 256, (1, 3, 5, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    video = u8.float() / 127.5 - 1
    packed = codec.encode(video)  # (1, 4 + 4 + K, 2, 4, 4)
    z, cond = packed[:, :4], packed[:, 4:8]
    image = unpack_image_embeds(packed[:, 8:], model.image_tokens, model.image_dim)

    # The pipeline's own conditioning for the same first frame: cat([mask (4), latent condition (4)]).
    pipe = WanImageToVideoPipeline.from_pretrained(wan_i2v_dir)
    first = Image.fromarray(u8[0, :, 0].permute(1, 2, 0).numpy())
    pixels = pipe.video_processor.preprocess(first, height=32, width=32)
    _, ref = pipe.prepare_latents(pixels, 1, 4, 32, 32, 5, torch.float32, torch.device("cpu"), None, None)
    torch.testing.assert_close(first_frame_mask(1, 4, (2, 4, 4)), ref[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(cond, ref[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image, pipe.encode_image(first, torch.device("cpu")), atol=1e-6, rtol=0)
    # The clip latent itself: the VAE's mode normalized per channel, (z - mean) / std.
    raw = pipe.vae.encode(video).latent_dist.mode()
    mean, std = (
        torch.tensor(WAN_LATENTS_MEAN).view(1, 4, 1, 1, 1),
        torch.tensor(WAN_LATENTS_STD).view(1, 4, 1, 1, 1),
    )
    torch.testing.assert_close(z, (raw - mean) / std, atol=1e-6, rtol=0)

    # The loss: only the first 4 channels are noised; the transformer gets cat([x_t, mask, cond]) and the
    # CLIP tokens; loss = mean((v - (noise - z))^2).
    emb = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2))
    inputs = objective.draw(packed, torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = objective.loss(model(inputs.x_t, inputs.t, emb, torch.ones(1, 3, dtype=torch.bool)), inputs)
        g = torch.Generator().manual_seed(3)
        t = torch.rand(1, generator=g)
        t = 3 * t / (1 + 2 * t)
        noise = torch.randn(z.shape, generator=g)
        x_t = (1 - t) * z + t * noise
        hidden = torch.cat([x_t, ref[:, :4], cond], dim=1)
        text = torch.nn.functional.pad(emb, (0, 0, 0, TEXT_LEN - 3))
        v = model.transformer(
            hidden_states=hidden,
            timestep=1000 * t,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
        ).sample
        expected = ((v - (noise - z)) ** 2).mean()
    assert torch.equal(inputs.x_t[:, 4:], packed[:, 4:])  # conditions pass through untouched
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_i2v_validation_writes_an_mp4_without_ftfy(wan_i2v_dir, manifest, tmp_path, monkeypatch):
    """diffusers 0.42's WanImageToVideoPipeline cleans prompt *strings* with ftfy unconditionally; validation
    hands it frameloom's prompt embeddings instead, so it runs where ftfy is not installed."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    from frameloom.sampling.video_io import read_mp4

    # ftfy absent, whether or not this environment has it: `import ftfy` fails and the pipeline module has
    # no `ftfy` (its prompt_clean would raise NameError on a string prompt).
    monkeypatch.setitem(sys.modules, "ftfy", None)
    monkeypatch.delattr(wan_i2v, "ftfy", raising=False)
    with pytest.raises(NameError):
        wan_i2v.prompt_clean("a red ball")
    image = solid_image(tmp_path / "first.png", 32, 200)
    cfg = wan_cfg(
        wan_i2v_dir,
        manifest,
        tmp_path / "run",
        "model.lora.rank=4",
        "model.id_token=TOK",
        "validation.prompts=[a red ball]",
        f"model.config={{validation_images: [{image}]}}",
    )
    family = get_family("wan")
    model = family.build_denoiser(cfg.model, 4, 32).eval()
    encoder, codec = pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu")
    paths = family.validate(model, encoder, codec, cfg, tmp_path / "samples")
    assert [p.name for p in paths] == ["000-a_red_ball-seed0.mp4"]
    assert read_mp4(paths[0]).shape == (WAN_CLIP["num_frames"], 32, 32, 3)


def test_image_embeds_round_trip_through_channels():
    emb = torch.randn(2, 5, 16)
    packed = pack_image_embeds(emb, (2, 4, 4))  # 80 values in ceil(80 / 32) = 3 channels of 2 x 4 x 4
    assert packed.shape == (2, 3, 2, 4, 4)
    assert torch.equal(unpack_image_embeds(packed, 5, 16), emb)
    assert torch.count_nonzero(packed.flatten(1)[:, 80:]) == 0


def test_i2v_codec_identity_follows_the_image_encoder(wan_i2v_dir, manifest, tmp_path):
    from frameloom.models.wan.i2v import WanI2VCodec

    codec = get_family("wan").load_codec(
        wan_cfg(wan_i2v_dir, manifest, tmp_path / "run"), torch.device("cpu")
    )
    changed = WanI2VCodec(codec.vae_codec, _perturbed(codec.image_encoder), codec.image_processor)
    assert changed.identity != codec.identity
    same = WanI2VCodec(codec.vae_codec, codec.image_encoder, codec.image_processor)
    assert same.identity == codec.identity


def _perturbed(module):
    import copy

    module = copy.deepcopy(module)
    with torch.no_grad():
        next(module.parameters()).add_(1e-3)
    return module


def test_missing_parts_are_named(wan_i2v_dir, manifest, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(wan_i2v_dir, broken)
    shutil.rmtree(broken / "image_encoder")
    with pytest.raises(FrameloomError, match="image_encoder/"):
        get_family("wan").build_objective(wan_cfg(broken, manifest, tmp_path / "run"))


def test_comfyui_names():
    assert comfyui_module("blocks.3.attn1.to_q") == "blocks.3.self_attn.q"
    assert comfyui_module("blocks.0.attn2.to_out.0") == "blocks.0.cross_attn.o"
    assert comfyui_module("blocks.1.attn2.add_k_proj") == "blocks.1.cross_attn.k_img"
    assert comfyui_module("blocks.1.ffn.net.0.proj") == "blocks.1.ffn.0"
    assert comfyui_module("proj_out") == "head.head"
    with pytest.raises(FrameloomError):
        comfyui_module("blocks.0.norm2")


# ------------------------------------------------------------------------------------------------ training


def test_lora_steps_train_only_the_adapter(lora_run, wan_dir):
    from diffusers import WanTransformer3DModel

    run, result = lora_run
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    _, model, _ = load_run_denoiser(run)
    base = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer").state_dict()
    assert_lora_trained_only_the_adapter(model.transformer.state_dict(), base)
    assert len(list((run / "samples" / "step-00000002").glob("*.mp4"))) == 1  # validation via WanPipeline


@pytest.mark.slow
def test_full_steps_and_diffusers_export(wan_dir, manifest, tmp_path):
    from diffusers import WanPipeline

    run = tmp_path / "full"
    result = train(wan_cfg(wan_dir, manifest, run, "model.lora.rank=0"))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert_full_run_exports(run, wan_dir, WanPipeline, tmp_path / "export")


# ------------------------------------------------------------------------------------------------ export + parity


def _pipeline_latents(pipe, seed: int = 7, **kw):
    return pipe(
        num_frames=WAN_CLIP["num_frames"],
        height=WAN_CLIP["height"],
        width=WAN_CLIP["width"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kw,
    ).frames


def test_lora_export_loads_in_the_pipeline_and_matches_frameloom_sampling(lora_run, wan_dir, tmp_path):
    from diffusers import WanPipeline

    run, _ = lora_run
    written = export_run(run, fmt="lora", out=tmp_path / "lora", comfyui=True, dtype="fp32")
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"]
    cfg, model, _ = load_run_denoiser(run)
    ours = sample_latents(
        model, pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu"), cfg, ["a red ball"], [7]
    )

    pipe = WanPipeline.from_pretrained(wan_dir)
    kw = dict(prompt="a red ball", max_sequence_length=TEXT_LEN)
    base = _pipeline_latents(pipe, **kw)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    with_lora = _pipeline_latents(pipe, **kw)
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA changes the pipeline's output
    torch.testing.assert_close(ours, with_lora, atol=PARITY_ATOL, rtol=0)

    # The ComfyUI-named file (original Wan module names) reads back to the same LoRA through diffusers'
    # own converter for original-format Wan LoRAs.
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="lora_comfyui.safetensors")
    torch.testing.assert_close(_pipeline_latents(pipe, **kw), with_lora, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_i2v_lora_trains_exports_and_matches_the_pipeline(wan_i2v_dir, manifest, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    run = tmp_path / "i2v"
    targets = "model.lora.target_modules=[to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj]"
    result = train(wan_cfg(wan_i2v_dir, manifest, run, "model.lora.rank=4", targets, "optim.lr=1e-2"))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    export_run(run, fmt="lora", out=tmp_path / "lora", dtype="fp32")
    cfg, model, _ = load_run_denoiser(run)
    encoder, codec = pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu")
    u8 = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    ours = sample_latents(
        model, encoder, codec, cfg, ["a red ball"], [7], images=(u8.float() / 127.5 - 1)[None]
    )

    # diffusers 0.42's Wan I2V pipeline cleans prompt strings with ftfy unconditionally (an optional
    # dependency, not installed here), so it gets the prompt embeddings, computed as it would (the T2V test
    # checks that text path).
    emb, mask = encoder.encode(["a red ball"])
    neg, neg_mask = encoder.encode([""])
    pipe = WanImageToVideoPipeline.from_pretrained(wan_i2v_dir)
    kw = dict(
        image=Image.fromarray(u8.permute(1, 2, 0).numpy()),
        prompt_embeds=fixed_length_text(emb, mask, TEXT_LEN),
        negative_prompt_embeds=fixed_length_text(neg, neg_mask, TEXT_LEN),
    )
    base = _pipeline_latents(pipe, **kw)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    with_lora = _pipeline_latents(pipe, **kw)
    assert (with_lora - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, with_lora, atol=PARITY_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_come_from_the_family_not_the_schema(wan_dir, manifest, tmp_path):
    """Without the preset (no model.text_max_length, objective.shift, timestep_sampling): Wan's own 512 text
    tokens (the pipeline's and ComfyUI's), uniform times and the scheduler's shift 3."""
    cfg = load_config(None, family_config("wan", wan_dir, manifest, tmp_path / "run"))
    assert cfg.model.text_max_length is None and cfg.objective.shift is None
    assert get_family("wan").build_denoiser(cfg.model, 0, 0).text_len == 512
    assert pl.load_text_encoder(cfg, "cpu").max_length == 512
    flow = get_family("wan").build_objective(cfg)
    assert (flow.shift, flow.timestep_sampling) == (3.0, "uniform")


def test_shift_one_is_an_unshifted_schedule(wan_dir, manifest, tmp_path):
    """objective.shift / sample.shift 1.0 mean "no shift", null means the scheduler's (3.0 here)."""
    from frameloom.models.wan.family import _solver

    family = get_family("wan")
    assert family.build_objective(wan_cfg(wan_dir, manifest, tmp_path, "objective.shift=1.0")).shift == 1.0
    assert family.build_objective(wan_cfg(wan_dir, manifest, tmp_path)).shift == 3.0
    model = family.build_denoiser(wan_cfg(wan_dir, manifest, tmp_path).model, 0, 0)
    for shift, expected in (("1.0", 1.0), ("null", 3.0)):
        cfg = wan_cfg(wan_dir, manifest, tmp_path, f"sample.shift={shift}", "sample.steps=4")
        assert torch.equal(_solver(model, cfg)["sigmas"], flow_match_sigmas(4, {"shift": expected}))
    # 4 steps unshifted: linspace(1, 1/1000, 4) then 0 (the training grid's last time is 1/1000)
    unshifted = _solver(model, wan_cfg(wan_dir, manifest, tmp_path, "sample.shift=1.0", "sample.steps=4"))
    assert unshifted["sigmas"].tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)


def test_sampling_uses_the_folders_unipc_like_the_pipeline(manifest, tmp_path):
    """The released Wan folders ship UniPC: frameloom's sample equals WanPipeline with that scheduler (also
    with a negative prompt and an id token, which goes on the prompt only), and the mp4 says which solver
    made it. Measured max |diff| on latents ~1e-6 (batched vs separate cond/uncond forwards)."""
    import av
    from diffusers import WanPipeline

    from frameloom.sampling.generate import generate_to_files

    root = build_tiny_wan(tmp_path / "unipc", scheduler="unipc")
    extra = ("sample.steps=3", "sample.negative_prompt=blurry", "model.id_token=TOK")
    cfg = wan_cfg(root, manifest, tmp_path / "run", *extra)
    model = get_family("wan").build_denoiser(cfg.model, 0, 0).eval()
    encoder, codec = pl.load_text_encoder(cfg, "cpu"), pl.load_codec(cfg, "cpu")
    ours = sample_latents(model, encoder, codec, cfg, ["a red ball"], [7])
    pipe = WanPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="TOK a red ball", negative_prompt="blurry", max_sequence_length=TEXT_LEN)
    theirs = pipe(
        num_frames=WAN_CLIP["num_frames"],
        height=WAN_CLIP["height"],
        width=WAN_CLIP["width"],
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
        **kw,
    ).frames
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    torch.testing.assert_close(ours, theirs, atol=PARITY_ATOL, rtol=0)
    # Euler on the same shifted grid is a different solver: far from the pipeline's UniPC.
    euler = sample_latents(
        model, encoder, codec, wan_cfg(root, manifest, tmp_path / "run", *extra, "sample.scheduler=euler"),
        ["a red ball"], [7],
    )  # fmt: skip
    assert (euler - theirs).abs().max() > 1e-2
    (path,) = generate_to_files(model, encoder, codec, cfg, ["a red ball"], out_dir=tmp_path / "out")
    with av.open(str(path)) as container:
        assert container.metadata["comment"] == (
            "frameloom sampler: UniPCMultistepScheduler, 3 steps, shift 3, guidance 3"
        )
