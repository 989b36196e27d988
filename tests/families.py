"""Tiny random model families saved as real diffusers directories (nothing is downloaded).

Each builder writes ``model_index.json`` plus ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` with the family's own diffusers classes, so the tests exercise the same
``from_pretrained`` code a real checkpoint goes through. The text encoder is frameloom's tiny T5 (2 layers,
d_model 32) with a ByT5 byte tokenizer, which needs no vocabulary file.

``family_config(...)`` is the override list of a tiny run of any family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from frameloom.models.text import build_tiny_t5

# CogVideoX's real scheduler config (THUDM/CogVideoX-2b scheduler_config.json values).
COGVIDEOX_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    steps_offset=0,
    timestep_spacing="trailing",
)

#: Tiny clips: 5 frames of 16x16 -> latents (3, 8, 8) with the tiny VAE below (time /2, space /2).
TINY_CLIP = dict(num_frames=5, height=16, width=16)


def tiny_text_parts(out: Path, *, umt5: bool = False) -> dict:
    """``tokenizer`` (ByT5) and ``text_encoder`` (2 layers, d_model 32, seed 0; UMT5 for Wan) of a pipeline
    directory, built by frameloom's ``build_tiny_t5`` in ``out/.t5``."""
    from transformers import ByT5Tokenizer, T5EncoderModel, UMT5EncoderModel

    t5_dir = build_tiny_t5(out / ".t5", seed=0, umt5=umt5)
    model_cls = UMT5EncoderModel if umt5 else T5EncoderModel
    return dict(
        tokenizer=ByT5Tokenizer.from_pretrained(t5_dir), text_encoder=model_cls.from_pretrained(t5_dir)
    )


def build_tiny_cogvideox(
    out: str | Path,
    *,
    version: str = "1.0",
    i2v: bool = False,
    seed: int = 0,
    vae_seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
) -> Path:
    """A random CogVideoX pipeline directory: 2 layers, 2 heads x 16 dims, 4 latent channels, RoPE
    (``num_layers``, ``heads``, ``head_dim`` change the transformer's size).

    ``version="1.5"`` sets ``patch_size_t=2`` (temporal patch; no patch bias) as CogVideoX 1.5 does;
    ``i2v`` doubles the transformer's input channels (and for 1.5 adds the ``ofs`` embedding and the VAE's
    ``invert_scale_latents``), saved as a ``CogVideoXImageToVideoPipeline``.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    out = Path(out)
    is_15 = version == "1.5"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,  # 16: RoPE splits it 4 (time) + 6 + 6 (space), all even
            in_channels=8 if i2v else 4,
            out_channels=4,
            time_embed_dim=16,
            ofs_embed_dim=16 if (i2v and is_15) else None,
            text_embed_dim=32,
            num_layers=num_layers,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            patch_size_t=2 if is_15 else None,
            patch_bias=not is_15,
            temporal_compression_ratio=2,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
        )
        torch.manual_seed(vae_seed)
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 2,
            up_block_types=("CogVideoXUpBlock3D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=2,  # the tiny VAE halves time once: the pipeline must agree
            invert_scale_latents=bool(i2v and is_15),
        )
    pipe_cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    pipe = pipe_cls(
        **tiny_text_parts(out),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )
    pipe.save_pretrained(out)
    return out


def family_config(family: str, pretrained: Path, manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of a tiny run of ``family`` from ``pretrained`` on ``manifest`` (CPU, fp32, no EMA)."""
    return [
        f"model.family={family}",
        f"model.pretrained={pretrained}",
        f"data.manifest={manifest}",
        f"run_dir={run_dir}",
        f"data.num_frames={TINY_CLIP['num_frames']}",
        f"data.height={TINY_CLIP['height']}",
        f"data.width={TINY_CLIP['width']}",
        "train.batch_size=2",
        "train.steps=2",
        "train.ema_decay=0",
        "train.progress=false",
        "train.device=cpu",
        "logging.tensorboard=false",
        "checkpoint.every=0",
        "optim.lr=1e-3",
        "sample.steps=2",
        "sample.guidance=3.0",
        *extra,
    ]


def solid_image(path: Path, size: int, value: int) -> Path:
    """A ``size x size`` RGB png of one grey ``value`` (an I2V conditioning image for validation)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def assert_lora_trained_only_the_adapter(trained: dict, base: dict) -> None:
    """A LoRA run's transformer state ``trained`` vs the pretrained ``base``: every LoRA B moved from its zero
    init, and every base weight is bit-equal (PEFT renames adapted weights ``<module>.base_layer.<name>``)."""
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)
    for key, value in base.items():
        module, _, name = key.rpartition(".")
        assert torch.equal(trained.get(key, trained.get(f"{module}.base_layer.{name}")), value), key


def assert_full_run_exports(run: Path, pretrained: Path, pipe_cls: type, out: Path) -> None:
    """A full fine-tune ``run`` moved the transformer (``proj_out``) away from ``pretrained``, and
    ``export --format diffusers`` writes a directory whose ``pipe_cls.from_pretrained`` holds exactly the
    trained transformer."""
    from frameloom.export import export_run, load_run_denoiser

    _, model, _ = load_run_denoiser(run)
    base = pipe_cls.from_pretrained(pretrained).transformer
    assert not torch.equal(base.proj_out.weight, model.transformer.proj_out.weight)
    export_run(run, fmt="diffusers", out=out)
    exported = pipe_cls.from_pretrained(out).transformer.state_dict()
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(exported[key], value), key


def assert_pipeline_text_matches_prompt_strings(pipe, model, encoder, prompt: str, **call) -> None:
    """The family pipeline gives the same latents for ``prompt`` as a string (its own text path) and as
    frameloom's embeddings in ``model.pipeline_text`` form (what validation passes), negative prompt "".
    float32 on CPU, atol 1e-5 on latents of magnitude 2-5; measured: CogVideoX and LTX-Video exactly equal,
    Wan 9.5e-7 (UMT5 runs masked over the caption alone in frameloom, over max_length padding in the
    pipeline)."""

    def latents(**text):
        g = torch.Generator().manual_seed(0)
        return pipe(**text, **call, guidance_scale=3.0, output_type="latent", generator=g).frames

    negative = model.pipeline_text(*encoder.encode([""]))
    ours = latents(
        **model.pipeline_text(*encoder.encode([prompt])), **{f"negative_{k}": v for k, v in negative.items()}
    )
    torch.testing.assert_close(ours, latents(prompt=prompt, negative_prompt=""), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- Wan 2.1

#: Wan's tiny VAE compresses like the real one (time /4, space /8) and its transformer patches 2x2: 5 frames
#: of 32x32 give latents (2, 4, 4) and 2 x 2 x 2 = 8 tokens. The pipelines need sizes divisible by 16.
WAN_CLIP = dict(num_frames=5, height=32, width=32)
#: Non-trivial per-channel statistics, so the latent normalization is exercised.
WAN_LATENTS_MEAN = [0.1, -0.2, 0.3, 0.05]
WAN_LATENTS_STD = [1.5, 0.8, 1.2, 2.0]


def tiny_wan_transformer(i2v: bool = False):
    """The tiny Wan transformer of every Wan test (2 layers, 2 x 8 heads); seed the RNG before calling."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=12 if i2v else 4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        image_dim=16 if i2v else None,
        added_kv_proj_dim=16 if i2v else None,
    )


def build_tiny_wan(
    out: str | Path,
    *,
    i2v: bool = False,
    seed: int = 0,
    vae_seed: int = 0,
    shift: float = 3.0,
    scheduler: str = "euler",
) -> Path:
    """A random Wan 2.1 pipeline directory: 2 layers, 2 heads x 8 dims, 4 latent channels, UMT5 text.

    ``i2v`` adds the CLIP image encoder (2 layers, width 16, 32x32 images in 16x16 patches: 5 tokens) and
    processor, ``in_channels = 4 + 4 (mask) + 4 (condition)``, ``image_dim``/``added_kv_proj_dim``, saved as
    a ``WanImageToVideoPipeline``. The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=shift)``, or with
    ``scheduler="unipc"`` the ``UniPCMultistepScheduler`` config the released Wan 2.1 folders ship
    (``flow_prediction``, ``use_flow_sigmas``, ``flow_shift=shift``).
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
    )

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_wan_transformer(i2v)
        torch.manual_seed(vae_seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=WAN_LATENTS_MEAN,
            latents_std=WAN_LATENTS_STD,
        )
    parts = dict(
        **tiny_text_parts(out, umt5=True),
        vae=vae,
        transformer=transformer,
        scheduler=(
            UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
            if scheduler == "unipc"
            else FlowMatchEulerDiscreteScheduler(shift=shift)
        ),
    )
    if i2v:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            image_encoder = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=16,
                    projection_dim=16,
                )
            )
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        pipe = WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=processor)
    else:
        pipe = WanPipeline(**parts)
    pipe.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- LTX-Video

#: LTX-Video's tiny VAE compresses time /4 and space /4 (patch 1, two scaling blocks); the pipeline needs
#: sizes divisible by 32: 5 frames of 32x32 give latents (2, 8, 8) = 128 tokens (patch 1).
LTX_CLIP = dict(num_frames=5, height=32, width=32)
#: LTX-Video's real scheduler settings (Lightricks/LTX-Video scheduler_config.json values).
LTX_SCHEDULER = dict(
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)


def build_tiny_ltx(out: str | Path, *, seed: int = 0, vae_seed: int = 0, scaling_factor: float = 1.5) -> Path:
    """A random LTX-Video pipeline directory: 2 layers, 2 heads x 8 dims, 8 latent channels, tiny T5.

    The VAE's ``latents_mean``/``latents_std`` buffers and ``scaling_factor`` are set to non-trivial values
    (the real ones are per-channel statistics too) so the normalization ``(z - mean) * s / std`` is exercised.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from diffusers import LTXVideoTransformer3DModel as LTXTransformer

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = LTXTransformer(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=32,
        )
        torch.manual_seed(vae_seed)
        vae = AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
            scaling_factor=scaling_factor,
        )
        vae.latents_mean.copy_(torch.linspace(-0.3, 0.4, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    pipe = LTXPipeline(
        **tiny_text_parts(out),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
    )
    pipe.save_pretrained(out)
    return out
