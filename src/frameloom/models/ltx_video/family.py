"""The ``ltx_video`` family: LTX-Video (0.9.x text-to-video) from a local diffusers directory
(``model.pretrained``) with ``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo``, ``T5EncoderModel`` +
tokenizer and a ``FlowMatchEulerDiscreteScheduler`` config with dynamic shifting.

Objective: flow matching (``noise - x0``, transformer timestep ``1000 t``), times drawn by
``objective.timestep_sampling`` (LTX-Video's trainer: logit-normal(0, 1)) and shifted by ``e^mu`` for the
clip's latent token count with the scheduler's ``base/max_shift`` and ``base/max_image_seq_len``, the same
``mu`` the pipeline samples with; a set ``objective.shift`` (1.0: none) fixes the shift instead. The text is T5
over ``model.text_max_length`` (128 in the pipeline) padded ids without a mask (``PaddedT5TextEncoder``).
The RoPE time scale is each clip's frame rate as sampled (the manifest's ``fps`` after the frame stride,
``target_fps``, ``fps_max``, speed factor or spread: ``data.video.row_fps``), one per sample ``(B,)`` from the
dataset (cached entries carry it) through the collate into the adapter; clips without a known rate (images,
precomputed latents) take ``clip_frame_rate`` (``model.config.frame_rate``, else ``data.target_fps``, else 25).
Sampling and validation run at ``sample.fps`` (null: 25, ``DEFAULT_FPS``, the pipeline's ``frame_rate``;
ltx_video/adapter.py). First-frame conditioning
(``model.config.first_frame_conditioning_p``, default 0.1) trains the LoRA for image-to-video too, as
``LTXImageToVideoPipeline`` samples it (ltx_video/i2v.py); ``frameloom sample --image`` and
``model.config.validation_images`` sample that way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models import diffusers_family as df
from frameloom.models.lora import module_path_map
from frameloom.models.ltx_video.adapter import LTXDenoiser, LTXVideoCodec, ResolutionShiftedFlow
from frameloom.models.ltx_video.i2v import FirstFrameConditionedFlow, first_frame_euler
from frameloom.models.registry import sample_fps
from frameloom.models.text import PaddedT5TextEncoder
from frameloom.sampling.family_sampling import (
    conditioning_image_paths,
    decode_latents,
    flow_match_sigmas,
    flow_sample_latents,
    resolution_mu,
    validate_with_pipeline,
    validation_images,
)

__all__ = [
    "build_denoiser",
    "build_objective",
    "clip_frame_rate",
    "comfyui_module",
    "describe_sampler",
    "input_shapes",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_latents",
    "sample_videos",
    "sampling_sigmas",
    "validate",
]

#: ComfyUI's LTX-Video model (comfy/ldm/lightricks/model.py, ``LTXVModel``) keeps LTX-Video's original names:
#: the blocks' linear layers are diffusers' (``transformer_blocks.N.attn1.to_q`` ...), but the input
#: projection is ``patchify_proj`` (diffusers: ``proj_in``) and the timestep embedding ``adaln_single``
#: (diffusers: ``time_embed``), as diffusers' own converter (scripts/convert_ltx_to_diffusers.py) renames them.
_LTX_BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
comfyui_module = module_path_map(
    "ltx_video",
    blocks=("transformer_blocks", "transformer_blocks"),
    inner={
        **{f"{a}.{m}": f"{a}.{m}" for a in ("attn1", "attn2") for m in _LTX_BLOCK_LINEARS},
        "ff.net.0.proj": "ff.net.0.proj",
        "ff.net.2": "ff.net.2",
    },
    top={
        "proj_in": "patchify_proj",
        "caption_projection.linear_1": "caption_projection.linear_1",
        "caption_projection.linear_2": "caption_projection.linear_2",
        "proj_out": "proj_out",
    },
    prefixes={"time_embed": "adaln_single"},
)


def load_codec(cfg: Config, device: torch.device) -> LTXVideoCodec:
    """The frozen ``AutoencoderKLLTXVideo`` codec in ``model.encoder_dtype`` (tiling/slicing as configured)."""
    return df.load_vae_codec(cfg, device, LTXVideoCodec)


#: LTXPipeline's ``max_sequence_length``.
TEXT_LENGTH = 128

#: LTXPipeline's ``frame_rate``: the rate sampling runs (and writes mp4s) at when ``sample.fps`` is null.
DEFAULT_FPS = 25.0


def load_text_encoder(cfg: Config, device: torch.device):
    """T5 over ``model.text_max_length`` (null: 128) padded ids, unmasked (as ``LTXPipeline``), with
    ``model.id_token``."""
    return df.load_text_encoder(cfg, device, PaddedT5TextEncoder, default_length=TEXT_LENGTH)


def _vae_compression(root: Path) -> tuple[int, int, int]:
    """``(t, s, s)`` of the VAE without loading its weights: the ratios diffusers derives from its config."""
    cfg = df.part_config(root, "vae")
    scaling = cfg.get("spatio_temporal_scaling") or (True, True, True, False)
    levels = sum(bool(s) for s in scaling)
    s = cfg.get("spatial_compression_ratio") or int(cfg.get("patch_size", 4)) * 2**levels
    t = cfg.get("temporal_compression_ratio") or int(cfg.get("patch_size_t", 1)) * 2**levels
    return int(t), int(s), int(s)


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> LTXDenoiser:
    """The pretrained transformer (LoRA when ``model.lora.rank > 0``) in frameloom's layout.

    ``latent_channels``/``text_dim`` are checked against the transformer when given (> 0); a token carries
    ``C * p_t * p * p`` values.
    """
    root = df.check_pretrained(model_cfg, df.PARTS)
    transformer = df.load_trainable_transformer(model_cfg)
    config = transformer.config
    per_token = config.patch_size_t * config.patch_size**2
    df.check_widths(
        latent=(latent_channels, config.in_channels // per_token), text=(text_dim, config.caption_channels)
    )
    return LTXDenoiser(
        transformer,
        root,
        model_cfg.lora,
        vae_compression=_vae_compression(root),
        frame_rate=float(model_cfg.config.get("frame_rate", 25.0)),  # training/sampling pass clip_frame_rate
    )


def input_shapes(cfg: Config):
    """Latent and text shapes from the directory's configs (``frameloom plan``)."""
    from frameloom.memory.plan import InputShapes

    root = df.check_pretrained(cfg.model, df.PARTS)
    channels, compression = df.vae_latent_shape(root)
    caption = int(df.part_config(root, "transformer")["caption_channels"])
    return InputShapes(channels, compression, df.text_length(cfg.model, TEXT_LENGTH), caption)


def load_denoiser(path: str) -> LTXDenoiser:
    """A diffusers directory (or its ``transformer/`` folder) -> the full-weights denoiser, no LoRA."""
    return df.load_pretrained_denoiser(build_denoiser, "ltx_video", path)


def _shift_settings(config: dict) -> dict:
    """The scheduler's dynamic-shift line (diffusers' defaults where a key is missing, as the pipeline)."""
    return dict(
        base_seq_len=int(config.get("base_image_seq_len", 256)),
        max_seq_len=int(config.get("max_image_seq_len", 4096)),
        base_shift=float(config.get("base_shift", 0.5)),
        max_shift=float(config.get("max_shift", 1.15)),
    )


def clip_frame_rate(cfg: Config) -> float:
    """The training rate of clips whose own rate is unknown (images, precomputed latents; the others carry
    theirs, module docstring): ``model.config.frame_rate``, else ``data.target_fps`` (every clip is
    resampled to it), else 25 (the pipeline's default)."""
    rate = cfg.model.config.get("frame_rate", cfg.data.target_fps)
    return float(rate) if rate is not None else 25.0


def build_objective(cfg: Config) -> FirstFrameConditionedFlow:
    """Flow matching shifted by ``e^mu(tokens)`` (module docstring) with first-frame conditioning
    (``model.config.first_frame_conditioning_p``, default 0.1; ltx_video/i2v.py). Its ``frame_rate`` is the
    fallback ``clip_frame_rate``; the trainer replaces it by the batch's per-clip rates
    (``objectives.with_clip_frame_rates``)."""
    root = df.check_pretrained(cfg.model, df.PARTS)
    tcfg = df.part_config(root, "transformer")
    p, p_t = int(tcfg.get("patch_size", 1)), int(tcfg.get("patch_size_t", 1))
    flow = df.flow_objective(
        cfg,
        "auto",
        ResolutionShiftedFlow,
        patch=(p_t, p, p),
        **_shift_settings(df.part_config(root, "scheduler")),
    )
    try:
        return FirstFrameConditionedFlow(
            flow, float(cfg.model.config.get("first_frame_conditioning_p", 0.1)), clip_frame_rate(cfg)
        )
    except ValueError as exc:
        raise FrameloomError(f"model.config: {exc}") from None


def sampling_sigmas(
    root: str | Path, steps: int, latent_grid: tuple[int, int, int], shift: float | None = None
):
    """``LTXPipeline``'s grid: ``linspace(1, 1/n, n)`` shifted by ``e^mu`` for ``T H W`` latent tokens (the
    pipeline counts latent positions, not patches) and stretched to ``shift_terminal``; a ``shift`` (1.0:
    none) replaces the dynamic shift by that static one."""
    config = df.part_config(root, "scheduler")
    t, h, w = latent_grid
    if shift is not None:
        fixed = {**config, "use_dynamic_shifting": False, "shift": float(shift)}
        return flow_match_sigmas(steps, fixed, sigmas=np.linspace(1.0, 1 / steps, steps))
    mu = resolution_mu(t * h * w, **_shift_settings(config))
    return flow_match_sigmas(steps, config, mu=mu, sigmas=np.linspace(1.0, 1 / steps, steps))


@torch.no_grad()
def sample_latents(
    model: LTXDenoiser, text_encoder, codec, cfg: Config, prompts, seeds, images: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalized latents ``(N, C, t, h, w)`` on the pipeline's grid at ``sample.fps`` (null: 25): text-to-video
    as ``LTXPipeline`` (sampling/family_sampling.py), or with first frames ``images`` ``(N, 3, H, W)`` in
    [-1, 1] as ``LTXImageToVideoPipeline`` (ltx_video/i2v.py); ``images`` default to the config's
    (``frameloom sample --image``, ``model.config.validation_images``) when it names any."""
    grid = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    sigmas = sampling_sigmas(model.pretrained, cfg.sample.steps, grid, cfg.sample.shift)
    rate = {"frame_rate": sample_fps(cfg)}
    if images is None and conditioning_image_paths(cfg):
        images = validation_images(cfg, len(prompts))
    if images is None:
        return flow_sample_latents(
            model,
            text_encoder,
            prompts,
            seeds=seeds,
            latent_shape=(model.latent_channels, *grid),
            sigmas=sigmas,
            guidance=cfg.sample.guidance,
            negative_prompt=cfg.sample.negative_prompt,
            model_kwargs=rate,
        )
    device = next(model.parameters()).device
    neg = [x.to(device) for x in df.unwrap_text_encoder(text_encoder).encode([cfg.sample.negative_prompt])]
    out = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        # 1. The pipeline's draws: the image latent (a VAE sample) first, then the noise of the whole latent.
        g = torch.Generator().manual_seed(int(seed))
        first = codec.encode(images[i : i + 1, :, None].to(device), generator=g).float()  # (1, C, 1, h, w)
        x = torch.randn((1, model.latent_channels, *grid), generator=g).to(device)
        x[:, :, :1] = first
        emb, mask = text_encoder.encode([prompt])

        def model_fn(x, t, text, text_mask):
            return model(x, t, text, text_mask, **rate).float()

        # 2. Euler with frame 0 held at time 0 (never stepped).
        guidance = cfg.sample.guidance if cfg.sample.guidance > 1.0 else 1.0
        text = (emb.to(device), mask.to(device))
        out.append(first_frame_euler(model_fn, x, sigmas.to(device), text, tuple(neg), guidance))
    return torch.cat(out)


def describe_sampler(model: LTXDenoiser, cfg: Config) -> str:
    """What ``sample_videos`` integrates with, for the log and the mp4 metadata."""
    shift = "e^mu (resolution-dependent)" if cfg.sample.shift is None else f"{cfg.sample.shift:g}"
    return f"Euler (LTXPipeline's grid), {cfg.sample.steps} steps, shift {shift}, guidance {cfg.sample.guidance:g}"


@torch.no_grad()
def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds, images=None) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] (the family ``sample`` hook); image-to-video with ``images``
    or the config's first frames."""
    return decode_latents(codec, sample_latents(model, text_encoder, codec, cfg, prompts, seeds, images))


@torch.no_grad()
def validate(model: LTXDenoiser, text_encoder, codec, cfg: Config, out_dir) -> list[Path]:
    """``validation.prompts`` through ``LTXPipeline`` around the in-training transformer (LoRA active), at
    ``sample.fps`` (null: 25; the RoPE time scale); with first frames in the config (``sample.image``,
    ``model.config.validation_images``) through ``LTXImageToVideoPipeline`` instead."""
    rate = sample_fps(cfg)
    if not conditioning_image_paths(cfg):
        return validate_with_pipeline(
            model, text_encoder, codec, cfg, out_dir, extra=lambda i: {"frame_rate": rate}
        )
    from diffusers import LTXImageToVideoPipeline

    images = (validation_images(cfg, len(cfg.validation.prompts)) + 1) / 2  # the pipeline takes [0, 1]
    return validate_with_pipeline(
        model,
        text_encoder,
        codec,
        cfg,
        out_dir,
        extra=lambda i: {"frame_rate": rate, "image": images[i : i + 1]},
        pipeline_cls=LTXImageToVideoPipeline,
    )
