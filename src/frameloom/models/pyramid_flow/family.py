"""The ``pyramid_flow`` family: Pyramid Flow's released transformers (miniflux, sd3), its causal video VAE, its
T5 + CLIP text side, its objectives and samplers, wired into frameloom's registry hooks (seed_common.md).

Where the pieces come from:

- ``model.pretrained``: a released ``diffusion_transformer_*`` folder (or one ``frameloom export --format
  pyramid_flow`` wrote); the variant is read from its ``config.json``. Without it the transformer is built from
  ``model.preset`` (``miniflux`` / ``sd3``: the released sizes) plus ``model.config``.
- ``model.codec``: a ``causal_video_vae`` folder; ``pixel`` (the default) means the ``causal_video_vae`` beside
  ``model.pretrained``; ``tiny-pyramid`` builds a random tiny VAE (tests, shrunk presets).
- ``model.text_encoder``: the released root holding ``text_encoder*`` / ``tokenizer*``; unset means the folder
  above ``model.pretrained``; ``tiny-pyramid`` builds random tiny encoders.
- ``objective.name``: ``pyramid_flow`` (spatial pyramid, whole clip), ``pyramid_flow_ar`` (temporal pyramid)
  or ``flow`` (plain flow matching at full resolution, the benchmark's baseline); ``objective.pyramid`` holds
  the recipe knobs, ``sample.pyramid`` the sampler's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError

from .flux import PyramidFluxTransformer
from .loading import MINIFLUX_CLASS, SD3_CLASS, clean_checkpoint_keys, load_strict, read_config, read_weights
from .mmdit import PyramidMMDiT

__all__ = [
    "PRESETS",
    "build_denoiser",
    "build_objective",
    "describe_sampler",
    "export_released",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_videos",
]

TINY = "tiny-pyramid"
TEXT_MAX_LENGTH = 128  # T5 tokens per caption (the seed's max_sequence_length)
DEFAULT_OBJECTIVE = "pyramid_flow"  # objective.name null: the full-sequence recipe (the seed's "more stable")

#: the released architectures (SEED_MODELS.md; config.json of rain1011/pyramid-flow-{miniflux,sd3})
PRESETS: dict[str, dict[str, Any]] = {
    "miniflux": {
        "in_channels": 64,
        "num_layers": 8,
        "num_single_layers": 16,
        "attention_head_dim": 64,
        "num_attention_heads": 30,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 24, 24],
    },
    "sd3": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "joint_attention_dim": 4096,
    },
}
CLASSES = {"miniflux": PyramidFluxTransformer, "sd3": PyramidMMDiT}
RELEASED_CLASS = {"miniflux": MINIFLUX_CLASS, "sd3": SD3_CLASS}


# --------------------------------------------------------------------------------------------------------
# the transformer


def config_to_kwargs(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(variant, constructor kwargs) from a released ``config.json`` (upstream field names)."""
    name = config.get("_class_name")
    variant = {MINIFLUX_CLASS: "miniflux", SD3_CLASS: "sd3"}.get(name)
    if variant is None:
        raise FrameloomError(
            f"config.json _class_name {name!r} is not a Pyramid Flow transformer ({MINIFLUX_CLASS}, {SD3_CLASS})"
        )
    if variant == "sd3" and config.get("pos_embed_type", "sincos") != "sincos":
        raise FrameloomError(
            "the SD3 Pyramid Flow model needs pos_embed_type 'sincos' (upstream refuses 'rope')"
        )
    keys = set(PRESETS[variant]) | ({"interp_condition_pos"} if variant == "sd3" else set())
    kwargs = {k: config[k] for k in keys if k in config}
    if "use_temporal_causal" in config:
        kwargs["temporal_causal"] = bool(config["use_temporal_causal"])
    return variant, kwargs


def kwargs_to_config(model: torch.nn.Module) -> dict[str, Any]:
    """The released ``config.json`` of a model (upstream field names, so its ``from_pretrained`` reads it)."""
    cfg = dict(model.config)
    causal = cfg.pop("temporal_causal")
    out = {"_class_name": RELEASED_CLASS[model.variant], "_diffusers_version": "0.30.3", **cfg}
    out["use_temporal_causal"] = causal
    out["use_flash_attn"] = False
    out["use_gradient_checkpointing"] = False
    if model.variant == "miniflux":
        out["patch_size"] = 1  # upstream's config value; its model hard-codes the 2x2 patch
        out["interp_condition_pos"] = True
    else:
        out.update({"pos_embed_type": "sincos", "qk_norm": "rms_norm", "max_num_frames": 200})
    return out


def _variant(cfg: ModelConfig) -> str:
    variant = cfg.config.get("variant") or cfg.preset or "miniflux"
    if variant not in PRESETS:
        raise FrameloomError(f"model.preset / model.config.variant must be miniflux or sd3, not {variant!r}")
    return variant


def _construct(variant: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return CLASSES[variant](**kwargs)
    except TypeError as exc:
        raise FrameloomError(f"model.config ({variant}): {exc}") from None


def load_denoiser(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A released (or exported) ``diffusion_transformer_*`` folder, loaded strictly by key; ``overrides``
    change non-shape settings (``temporal_causal``)."""
    variant, kwargs = config_to_kwargs(read_config(path))
    kwargs.update(overrides or {})
    model = _construct(variant, kwargs)
    load_strict(model, clean_checkpoint_keys(read_weights(path)), str(path))
    return model


def _architecture(cfg: ModelConfig, latent_channels: int, text_dim: int) -> tuple[str, dict[str, Any]]:
    """(variant, constructor kwargs): the pretrained folder's config.json (``model.config`` may only change
    ``temporal_causal``), else ``model.preset`` + ``model.config`` with the text and latent widths defaulting
    to the encoders'."""
    overrides = {k: v for k, v in cfg.config.items() if k != "variant"}
    if cfg.pretrained:
        unknown = sorted(set(overrides) - {"temporal_causal"})
        if unknown:
            raise FrameloomError(
                f"model.config {unknown} cannot change a pretrained model's shape (only temporal_causal)"
            )
        variant, kwargs = config_to_kwargs(read_config(cfg.pretrained))
    else:
        variant = _variant(cfg)
        kwargs = dict(PRESETS[variant]) if cfg.preset else {}
        kwargs.setdefault("joint_attention_dim", text_dim)
        kwargs.setdefault("in_channels", latent_channels * (4 if variant == "miniflux" else 1))
    kwargs.update(overrides)
    return variant, kwargs


def build_denoiser(cfg: ModelConfig, latent_channels: int, text_dim: int) -> torch.nn.Module:
    """``model.pretrained`` (loaded strictly) if set, else ``model.preset`` + ``model.config``."""
    from frameloom.models.diffusers_family import parse_dtype

    if cfg.lora.rank > 0:
        raise FrameloomError(
            "model.lora.rank > 0 is not available for model.family pyramid_flow (its recipe fine-tunes the whole "
            "transformer); use model.lora.rank=0"
        )
    variant, kwargs = _architecture(cfg, latent_channels, text_dim)
    model = _construct(variant, kwargs)
    if cfg.pretrained:
        load_strict(model, clean_checkpoint_keys(read_weights(cfg.pretrained)), str(cfg.pretrained))
    return model.to(parse_dtype(cfg.dtype, "model.dtype"))


# --------------------------------------------------------------------------------------------------------
# encoders


def _models_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir).resolve().parent / ".frameloom_models"


def _released_root(cfg: Config) -> Path | None:
    return Path(cfg.model.pretrained).resolve().parent if cfg.model.pretrained else None


def _denoiser_variant(cfg: Config) -> str:
    if cfg.model.pretrained:
        return config_to_kwargs(read_config(cfg.model.pretrained))[0]
    return _variant(cfg.model)


def build_tiny_vae(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny causal VAE with the released compression (8x8x8, 16 channels) in the released layout."""
    from .loading import VAE_CLASS, write_folder
    from .vae import CausalVideoVAE, VAEConfig

    config = VAEConfig(
        encoder_block_out_channels=(8, 8, 16, 16),
        encoder_layers_per_block=(1, 1, 1, 1),
        encoder_norm_num_groups=4,
        decoder_block_out_channels=(8, 8, 16, 16),
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_norm_num_groups=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = CausalVideoVAE(config)
        for m in vae.modules():  # upstream init: trunc_normal(0.02) convolutions, zero biases
            if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                torch.nn.init.zeros_(m.bias)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}
    return write_folder(folder, {"_class_name": VAE_CLASS, **values}, vae.state_dict())


def load_codec(cfg: Config, device: torch.device):
    from frameloom.models.diffusers_family import parse_dtype

    from .codec import PyramidVAECodec

    variant = _denoiser_variant(cfg)
    name = cfg.model.codec
    if name == TINY:
        folder = _models_dir(cfg) / "tiny-pyramid-vae"
        if not (folder / "config.json").exists():
            build_tiny_vae(folder)
    elif name != "pixel":
        folder = Path(name)
    elif _released_root(cfg) is not None:
        folder = _released_root(cfg) / "causal_video_vae"
    else:
        raise FrameloomError(
            "model.codec: set the causal_video_vae folder (or model.pretrained inside a released Pyramid Flow "
            "folder, or tiny-pyramid)"
        )
    if not folder.is_dir():
        raise FrameloomError(f"model.codec: not a directory: {folder}")
    codec = PyramidVAECodec.from_pretrained(
        folder, variant, dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype")
    )
    codec.tiling = cfg.model.vae_tiling  # spatial tiles for large frames (model.vae_tiling)
    return codec.to(device)


def load_text_encoder(cfg: Config, device: torch.device):
    from frameloom.models.diffusers_family import parse_dtype

    from .text import PyramidTextEncoder, build_tiny

    variant = _denoiser_variant(cfg)
    name = cfg.model.text_encoder
    if name == TINY:
        root = _models_dir(cfg) / f"tiny-pyramid-text-{variant}"
        if not (root / "text_encoder").exists():
            build_tiny(root, variant)
    elif name is not None:
        root = Path(name)
    elif _released_root(cfg) is not None:
        root = _released_root(cfg)
    else:
        raise FrameloomError(
            "model.text_encoder: set the released Pyramid Flow root (text_encoder*/tokenizer*), or tiny-pyramid"
        )
    return PyramidTextEncoder.from_pretrained(
        root,
        variant,
        cfg.model.text_max_length or TEXT_MAX_LENGTH,
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
    )


# --------------------------------------------------------------------------------------------------------
# objective and sampling


def max_units(cfg: Config, frame_per_unit: int, max_latent_frames: int | None) -> int:
    """AR units per clip the position rotation is laid out for: ``objective.pyramid.max_latent_frames`` or
    ``data.num_frames`` through the VAE's 8x temporal compression (upstream --max_frames in latent frames)."""
    from frameloom.objectives.pyramid import check_ar_frames

    latent_frames = max_latent_frames or 1 + (cfg.data.num_frames - 1) // 8
    return check_ar_frames(latent_frames, frame_per_unit, cfg.parallel.video_sync_group)


def build_objective(cfg: Config):
    from frameloom.objectives.pyramid import (
        FullResolutionFlow,
        PyramidFlow,
        PyramidFlowAR,
        PyramidOptions,
        stage_assignment,
    )

    opts = PyramidOptions.from_dict(cfg.objective.pyramid)
    name = cfg.objective.name or DEFAULT_OBJECTIVE
    if name == "flow":
        return FullResolutionFlow(opts)
    if name not in ("pyramid_flow", "pyramid_flow_ar"):
        raise FrameloomError(
            f"objective.name {name!r} is not available for model.family pyramid_flow "
            "(pyramid_flow, pyramid_flow_ar or flow)"
        )
    stage_assignment(cfg.train.batch_size, opts.stage_ratios)  # the batch-size rule, checked up front
    if name == "pyramid_flow":
        if cfg.parallel.video_sync_group > 1:
            raise FrameloomError("parallel.video_sync_group > 1 needs objective.name=pyramid_flow_ar")
        return PyramidFlow(opts)
    units = max_units(cfg, opts.frame_per_unit, opts.max_latent_frames)
    return PyramidFlowAR(opts, max_units=units, grad_accum=cfg.train.grad_accum)


def _encode_prompts(text_encoder, texts: list[str], negative: str):
    """(cond, uncond): (tokens, mask, pooled) each, padded to one token length."""
    from frameloom.train.trainer import pad_text

    emb, mask = text_encoder.encode(texts)
    pooled = text_encoder.encode_extras(texts)["pooled"]
    nemb, nmask = text_encoder.encode([negative] * len(texts))
    npooled = text_encoder.encode_extras([negative] * len(texts))["pooled"]
    lengths = [int(m.sum()) for m in mask] + [int(m.sum()) for m in nmask]
    rows = [e[: max(n, 1)] for e, n in zip([*emb, *nemb], lengths)]
    masks = [m[: max(n, 1)] for m, n in zip([*mask, *nmask], lengths)]
    all_emb, all_mask = pad_text(rows, masks)
    dev = emb.device
    b = len(texts)
    cond = (all_emb[:b].to(dev), all_mask[:b].to(dev), pooled)
    uncond = (all_emb[b:].to(dev), all_mask[b:].to(dev), npooled)
    return cond, uncond


def sampling_mode(cfg: Config) -> str:
    """`ar`, `full` or `flow`: ``sample.pyramid.mode``, or (auto) the one the run's objective trained for."""
    from frameloom.sampling.pyramid import PyramidSampleOptions

    mode = PyramidSampleOptions.from_dict(cfg.sample.pyramid).mode
    if mode != "auto":
        return mode
    return {"pyramid_flow_ar": "ar", "flow": "flow"}.get(cfg.objective.name or DEFAULT_OBJECTIVE, "full")


def describe_sampler(model: torch.nn.Module, cfg: Config) -> str:
    """What `frameloom sample` logs and writes into each mp4's comment."""
    from frameloom.sampling.pyramid import PyramidSampleOptions

    opts, mode = PyramidSampleOptions.from_dict(cfg.sample.pyramid), sampling_mode(cfg)
    if mode == "flow":
        return f"Euler, {cfg.sample.steps} steps, guidance {cfg.sample.guidance:g}"
    text = f"pyramid stage Euler with renoising jumps, {opts.first_frame_steps} steps per stage"
    if mode == "ar":
        text += (
            f" (first frame, guidance {cfg.sample.guidance:g}), then unit by unit {opts.video_steps} "
            f"(guidance {opts.video_guidance:g})"
        )
    else:
        text += f", guidance {cfg.sample.guidance:g}"
    return text


@torch.no_grad()
def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds) -> torch.Tensor:
    """``frameloom sample`` / validation: videos ``(N, 3, T, H, W)`` in [-1, 1] (sampling/pyramid.py)."""
    from frameloom.objectives.pyramid import PyramidOptions, pyramid_schedule
    from frameloom.sampling.family_sampling import load_images
    from frameloom.sampling.pyramid import PyramidSampleOptions, generate_ar, generate_full, guided_velocity

    popts = PyramidOptions.from_dict(cfg.objective.pyramid)
    sopts = PyramidSampleOptions.from_dict(cfg.sample.pyramid)
    device = next(model.parameters()).device
    texts = [p + sopts.prompt_suffix for p in prompts]
    cond, uncond = _encode_prompts(text_encoder, texts, cfg.sample.negative_prompt)
    cond = tuple(x.to(device) for x in cond)
    uncond = tuple(x.to(device) for x in uncond)
    t, h, w = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    shape = (len(prompts), codec.latent_channels, t, h, w)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    mode = sampling_mode(cfg)
    first_frame = None
    if cfg.sample.image:
        if mode != "ar":
            raise FrameloomError(
                "sample.image (image-to-video) needs the AR sampler (objective pyramid_flow_ar)"
            )
        images = load_images([cfg.sample.image] * len(prompts), cfg.data.height, cfg.data.width)
        first_frame = codec.encode(images[:, :, None].to(codec.device)).to(device)  # (N, C, 1, h, w)
    if mode == "flow":  # plain flow matching: one full-resolution stage
        schedule = pyramid_schedule(1, (0.0, 1.0), popts.gamma, 1000, popts.shift)
        velocity = guided_velocity(model, cond, uncond, cfg.sample.guidance)
        steps = [cfg.sample.steps]
        latents = generate_full(velocity, shape, schedule, steps, generators, device)
    elif mode == "full":
        velocity = guided_velocity(model, cond, uncond, cfg.sample.guidance)
        latents = generate_full(
            velocity, shape, popts.schedule(), sopts.first_frame_steps, generators, device
        )
    else:
        first = guided_velocity(model, cond, uncond, cfg.sample.guidance)
        video = guided_velocity(model, cond, uncond, sopts.video_guidance)
        latents = generate_ar(
            first,
            video,
            shape,
            popts.schedule(),
            sopts.first_frame_steps,
            sopts.video_steps,
            popts.frame_per_unit,
            generators,
            device,
            first_frame=first_frame,
        )
    return codec.decode(latents.to(codec.device)).clamp(-1, 1).cpu()


def write_released(model: torch.nn.Module, out: str | os.PathLike) -> Path:
    """Write ``model`` as a released ``diffusion_transformer_*`` folder (config.json with upstream's field
    names + diffusion_pytorch_model.safetensors), which Pyramid Flow's ``from_pretrained`` and
    ``load_denoiser`` both read; verified by loading it back."""
    from .loading import write_folder

    folder = write_folder(out, kwargs_to_config(model), model.state_dict())
    back = load_denoiser(folder)
    for key, value in model.state_dict().items():
        if not torch.equal(value.cpu(), back.state_dict()[key].to(value.dtype)):
            raise FrameloomError(f"export check failed: {key} differs after loading {folder} back")
    return folder


def export_released(cfg: Config, weights: dict[str, torch.Tensor], out: str | os.PathLike) -> list[Path]:
    """``frameloom export --format native``: a run's trained transformer in the released layout (the widths
    a from-scratch model took from its encoders are read off its weights)."""
    embed = weights.get("x_embedder.weight", weights.get("pos_embed.proj.weight"))
    text = weights.get("context_embedder.weight")
    if embed is None or text is None:
        raise FrameloomError("--format native: the checkpoint holds no Pyramid Flow transformer")
    latent = embed.shape[1] // (4 if "x_embedder.weight" in weights else 1)
    variant, kwargs = _architecture(cfg.model, latent, text.shape[1])
    model = _construct(variant, kwargs)
    load_strict(model, weights, "the checkpoint")
    return [write_released(model, out)]
