"""The ``cogvideox`` family: CogVideoX 1.0 / 1.5, text-to-video and image-to-video, from a local diffusers
directory (``model.pretrained``) with ``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``,
``T5EncoderModel`` + T5 tokenizer and a ``CogVideoXDDIMScheduler``/``CogVideoXDPMScheduler`` config.

Which variant a directory is follows from its transformer config: ``patch_size_t`` set = 1.5 (temporal
patch 2), ``in_channels == 2 * out_channels`` = I2V. ``model.config`` may set ``noised_image_dropout``
(default 0.05), ``image_noise_mean`` (-3) / ``image_noise_std`` (0.5) and ``validation_images`` (I2V).
"""

from __future__ import annotations

import torch

from frameloom.config.schema import Config, ModelConfig, ObjectiveConfig
from frameloom.errors import FrameloomError
from frameloom.models import diffusers_family as df
from frameloom.models.cogvideox.model import CogVideoXDenoiser
from frameloom.models.cogvideox.objective import CogVideoXObjective
from frameloom.models.cogvideox.sampling import describe_sampler, sample_videos, validate
from frameloom.models.lora import module_path_map
from frameloom.models.text import PaddedT5TextEncoder
from frameloom.objectives.ddpm import DDPMSchedule

__all__ = [
    "build_denoiser",
    "build_objective",
    "comfyui_module",
    "describe_sampler",
    "input_shapes",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_videos",
    "validate",
]

#: ComfyUI's own CogVideoX model (comfy/ldm/cogvideo/model.py: ``CogVideoXBlock`` names its layers
#: ``q, k, v, attn_out, ff_proj, ff_out``; ``CogVideoXTransformer3DModel`` keeps its blocks in ``blocks`` and
#: flattens the time/ofs embeddings to ``time_embedding_linear_1`` ...). diffusers module path -> ComfyUI's.
comfyui_module = module_path_map(
    "cogvideox",
    blocks=("transformer_blocks", "blocks"),
    inner={
        "attn1.to_q": "q",
        "attn1.to_k": "k",
        "attn1.to_v": "v",
        "attn1.to_out.0": "attn_out",
        "ff.net.0.proj": "ff_proj",
        "ff.net.2": "ff_out",
        "norm1.linear": "norm1.linear",
        "norm2.linear": "norm2.linear",
    },
    top={
        "patch_embed.proj": "patch_embed.proj",
        "patch_embed.text_proj": "patch_embed.text_proj",
        "time_embedding.linear_1": "time_embedding_linear_1",
        "time_embedding.linear_2": "time_embedding_linear_2",
        "ofs_embedding.linear_1": "ofs_embedding_linear_1",
        "ofs_embedding.linear_2": "ofs_embedding_linear_2",
        "norm_out.linear": "norm_out.linear",
        "proj_out": "proj_out",
    },
)


def load_codec(cfg: Config, device: torch.device):
    """``AutoencoderKLCogVideoX`` (latent ``z * scaling_factor``), frozen, in ``model.encoder_dtype``."""
    return df.load_vae_codec(cfg, device)


def load_text_encoder(cfg: Config, device: torch.device):
    """T5 over exactly ``max_text_seq_length`` (226) tokens, unmasked, the padding kept (what the pipeline's
    ``_get_t5_prompt_embeds`` gives the transformer), with ``model.id_token``. ``model.text_max_length``
    may only repeat that length: the transformer's positions are laid out for it."""
    root = df.check_pretrained(cfg.model, df.PARTS)
    length = int(df.part_config(root, "transformer").get("max_text_seq_length", 226))
    if df.text_length(cfg.model, length) != length:
        raise FrameloomError(
            f"model.text_max_length: CogVideoX takes exactly {length} text tokens (max_text_seq_length); "
            "leave it null"
        )
    return df.load_text_encoder(cfg, device, PaddedT5TextEncoder, default_length=length, keep_padding=True)


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> CogVideoXDenoiser:
    """The pretrained transformer (LoRA applied when ``model.lora.rank > 0``) in frameloom's layout.

    ``latent_channels``/``text_dim`` are checked against the transformer when given (> 0).
    """
    transformer = df.load_trainable_transformer(model_cfg)
    config = transformer.config
    df.check_widths(
        latent=(latent_channels, config.out_channels or config.in_channels),
        text=(text_dim, config.text_embed_dim),
    )
    return CogVideoXDenoiser(transformer, model_cfg.pretrained, model_cfg.lora)


def input_shapes(cfg: Config):
    """Latent and text shapes from the directory's configs (``frameloom plan``)."""
    from frameloom.memory.plan import InputShapes

    root = df.check_pretrained(cfg.model, df.PARTS)
    channels, compression = df.vae_latent_shape(root)
    t = df.part_config(root, "transformer")
    return InputShapes(
        channels, compression, int(t.get("max_text_seq_length", 226)), int(t["text_embed_dim"])
    )


def load_denoiser(path: str) -> CogVideoXDenoiser:
    """A diffusers directory (or a bare transformer folder) -> the full-weights denoiser, no LoRA."""
    return df.load_pretrained_denoiser(build_denoiser, "cogvideox", path)


def build_objective(cfg: Config) -> CogVideoXObjective:
    """v-prediction DDPM from ``<pretrained>/scheduler`` + frame padding (1.5) + I2V conditioning."""
    root = df.check_pretrained(cfg.model, df.PARTS)
    df.check_objective_name(cfg, "ddpm")
    check_ddpm_options(cfg.objective)
    config = df.part_config(root, "transformer")
    vae_config = df.part_config(root, "vae")
    i2v = config.get("in_channels") == 2 * (config.get("out_channels") or config.get("in_channels"))
    s = float(vae_config.get("scaling_factor", 1.15258426))
    extra = cfg.model.config
    return CogVideoXObjective(
        DDPMSchedule.from_pretrained(root),
        patch_size_t=config.get("patch_size_t"),
        i2v=i2v,
        image_scale=1.0 / (s * s) if vae_config.get("invert_scale_latents") else 1.0,
        noised_image_dropout=float(extra.get("noised_image_dropout", 0.05)),
        image_noise_mean=float(extra.get("image_noise_mean", -3.0)),
        image_noise_std=float(extra.get("image_noise_std", 0.5)),
        t_range=(cfg.objective.min_t, cfg.objective.max_t),
    )


def check_ddpm_options(o: ObjectiveConfig) -> None:
    """CogVideoX's DDPM draws uniform integer timesteps (in ``[min_t, max_t)`` of the 1000) and weights its
    loss itself: the flow-matching options are refused rather than ignored."""
    unsupported = []
    if o.timestep_sampling not in (None, "uniform"):
        unsupported.append(f"objective.timestep_sampling={o.timestep_sampling}")
    if o.shift is not None:
        unsupported.append(f"objective.shift={o.shift}")
    if o.loss_weighting != "none":
        unsupported.append(f"objective.loss_weighting={o.loss_weighting}")
    if unsupported:
        raise FrameloomError(
            f"model.family cogvideox (v-prediction DDPM) has no {', '.join(unsupported)}; only "
            "objective.min_t/max_t restrict its timesteps"
        )
