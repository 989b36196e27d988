"""The ``cogvideox`` family: CogVideoX 1.0 / 1.5, text-to-video and image-to-video, from a local diffusers
directory (``model.pretrained``) with ``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``,
``T5EncoderModel`` + T5 tokenizer and a ``CogVideoXDDIMScheduler``/``CogVideoXDPMScheduler`` config.

Which variant a directory is follows from its transformer config: ``patch_size_t`` set = 1.5 (temporal
patch 2), ``in_channels == 2 * out_channels`` = I2V. ``model.config`` may set ``noised_image_dropout``
(default 0.05), ``image_noise_mean`` (-3) / ``image_noise_std`` (0.5) and ``validation_images`` (I2V).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models import diffusers_family as df
from frameloom.models.cogvideox.model import CogVideoXDenoiser
from frameloom.models.cogvideox.objective import CogVideoXObjective
from frameloom.models.cogvideox.sampling import sample_videos, validate
from frameloom.models.cogvideox.text import CogVideoXT5Encoder
from frameloom.objectives.ddpm import DDPMSchedule

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def _transformer_config(model_cfg: ModelConfig) -> dict:
    root = df.check_pretrained(model_cfg, PARTS)
    return json.loads((root / "transformer" / "config.json").read_text())


def load_codec(cfg: Config, device: torch.device):
    """``AutoencoderKLCogVideoX`` (latent ``z * scaling_factor``), frozen, in ``model.encoder_dtype``."""
    df.check_pretrained(cfg.model, PARTS)
    return df.load_vae_codec(cfg, device)


def load_text_encoder(cfg: Config, device: torch.device):
    """T5 over exactly ``max_text_seq_length`` (226) tokens, unmasked (text.py), with ``model.id_token``."""
    root = df.check_pretrained(cfg.model, PARTS)
    max_length = int(_transformer_config(cfg.model).get("max_text_seq_length", 226))
    encoder = CogVideoXT5Encoder.from_pretrained(
        root,
        max_length=max_length,
        dtype=df.parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
    )
    return df.with_id_token(encoder, cfg.model.id_token)


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> CogVideoXDenoiser:
    """The pretrained transformer (LoRA applied when ``model.lora.rank > 0``) in frameloom's layout.

    ``latent_channels``/``text_dim`` are checked against the transformer when given (> 0).
    """
    transformer = df.load_trainable_transformer(model_cfg)
    config = transformer.config
    out_channels = config.out_channels or config.in_channels
    if latent_channels and latent_channels != out_channels:
        raise FrameloomError(f"the VAE has {latent_channels} latent channels, the transformer {out_channels}")
    if text_dim and text_dim != config.text_embed_dim:
        raise FrameloomError(
            f"the text encoder has dim {text_dim}, the transformer expects {config.text_embed_dim}"
        )
    return CogVideoXDenoiser(transformer, model_cfg.pretrained, model_cfg.lora)


def load_denoiser(path: str) -> CogVideoXDenoiser:
    """A diffusers directory (or a bare transformer folder) -> the full-weights denoiser, no LoRA."""
    root = Path(path)
    pretrained = root if (root / "model_index.json").is_file() else root.parent
    model_cfg = ModelConfig(family="cogvideox", pretrained=str(pretrained))
    return build_denoiser(model_cfg, 0, 0)


def build_objective(cfg: Config) -> CogVideoXObjective:
    """v-prediction DDPM from ``<pretrained>/scheduler`` + frame padding (1.5) + I2V conditioning."""
    root = df.check_pretrained(cfg.model, PARTS)
    if cfg.objective.name not in ("ddpm", "flow"):  # "flow" is the schema default: the family decides
        raise FrameloomError(
            f"model.family cogvideox trains with objective.name=ddpm, not {cfg.objective.name!r}"
        )
    config = _transformer_config(cfg.model)
    vae_config = json.loads((root / "vae" / "config.json").read_text())
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
    )


def pipeline_class(cfg: Config) -> type:
    """``CogVideoXPipeline`` or ``CogVideoXImageToVideoPipeline``, as the directory's model_index.json says."""
    return df.pipeline_class(df.check_pretrained(cfg.model, PARTS))


def family():
    from frameloom.models.registry import Family

    return Family(
        "cogvideox",
        build_denoiser,
        load_denoiser,
        load_codec=load_codec,
        load_text_encoder=load_text_encoder,
        build_objective=build_objective,
        sample=sample_videos,
        validate=validate,
        pipeline_class=pipeline_class,
        comfyui_module=None,  # ComfyUI's CogVideoX loaders use diffusers' module names
    )
