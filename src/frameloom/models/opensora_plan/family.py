"""The ``opensora_plan`` family: Open-Sora-Plan v1.3's Skiparse DiT on WF-VAE latents with mT5-XXL text,
trained with its DDPM recipe and sampled with diffusers' schedulers' maths (docs/opensora_plan.md).

- ``model.pretrained``: a released DiT folder (``any93x640x640/``: ``config.json`` +
  ``diffusion_pytorch_model.safetensors``), loaded strictly, ``model.config`` overriding its config entries;
  else ``model.preset`` (``2B/122``) +
  ``model.config`` (``OpenSoraPlanConfig`` keys; ``in_channels``/``caption_channels`` default to the codec's
  latent channels and the text encoder's width).
- ``model.codec``: a released WF-VAE folder (``vae/``), or ``pixel``; ``model.vae_tiling`` = chunked.
- ``model.text_encoder``: a local mT5 (``google/mt5-xxl``) folder; ``model.text_max_length`` 512.
- ``objective.name: ddpm`` (``objective.prediction_type``, ``rescale_betas_zero_snr``, ``snr_gamma``,
  ``timestep_sampling: explicit_uniform``); sampling ``sample.scheduler``.
- ``export_released``: the trained weights as a released DiT folder (``frameloom export --format native``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.opensora_plan.codec import WFVAECodec
from frameloom.models.opensora_plan.model import PRESETS, OpenSoraPlanConfig, OpenSoraPlanT2V
from frameloom.models.opensora_plan.released import (
    DIT_CLASS,
    load_state_strict,
    read_config,
    read_weights,
    write_folder,
)

__all__ = [
    "build_denoiser",
    "build_objective",
    "export_released",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_videos",
]


def _dtype(name: str, key: str) -> torch.dtype:
    from frameloom.models.diffusers_family import parse_dtype

    return parse_dtype(name, key)


def load_denoiser(path: str | os.PathLike, overrides: dict | None = None) -> OpenSoraPlanT2V:
    """A released ``OpenSoraT2V_v1_3`` folder -> the DiT with its weights (strict: one line naming the
    missing/unexpected keys otherwise). ``overrides`` replace entries of its ``config.json`` (e.g. ``sparse_n``
    or the RoPE interpolation scales; one that changes a weight's shape fails the strict load)."""
    cfg = OpenSoraPlanConfig.from_dict({**read_config(path, DIT_CLASS), **(overrides or {})})
    model = OpenSoraPlanT2V(cfg)
    load_state_strict(model, read_weights(path), f"Open-Sora-Plan DiT weights in {path}")
    return model


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> OpenSoraPlanT2V:
    """``model.pretrained`` if set, else ``model.preset`` + ``model.config``; widths checked against the codec
    and text encoder when given (> 0)."""
    if model_cfg.lora.rank:
        raise FrameloomError("model.family opensora_plan: LoRA is not supported; use model.lora.rank=0")
    if model_cfg.pretrained:
        model = load_denoiser(model_cfg.pretrained, model_cfg.config)
        model.to(_dtype(model_cfg.dtype, "model.dtype"))
    else:
        values: dict = {}
        if model_cfg.preset is not None:
            if model_cfg.preset not in PRESETS:
                raise FrameloomError(
                    f"unknown model.preset {model_cfg.preset!r} for opensora_plan; available: {', '.join(PRESETS)}"
                )
            values.update(PRESETS[model_cfg.preset])
        values.update(model_cfg.config)
        if latent_channels > 0:
            values.setdefault("in_channels", latent_channels)
            values.setdefault("out_channels", latent_channels)
        if text_dim > 0:
            values.setdefault("caption_channels", text_dim)
        model = OpenSoraPlanT2V(OpenSoraPlanConfig.from_dict(values))
    c = model.config
    if latent_channels > 0 and latent_channels != c.in_channels:
        raise FrameloomError(
            f"the codec has {latent_channels} latent channels, the DiT takes {c.in_channels}"
        )
    if text_dim > 0 and text_dim != c.caption_channels:
        raise FrameloomError(
            f"the text encoder is {text_dim} wide, the DiT's caption_channels is {c.caption_channels}"
        )
    return model


def load_codec(cfg: Config, device: torch.device):
    """A released WF-VAE folder (``model.codec``) in ``model.encoder_dtype``; ``pixel`` for experiments."""
    from frameloom.models.codecs import PixelCodec

    if cfg.model.codec == "pixel":
        return PixelCodec()
    return WFVAECodec.from_pretrained(
        cfg.model.codec,
        dtype=_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        tiling=cfg.model.vae_tiling,
    )


def load_text_encoder(cfg: Config, device: torch.device):
    """mT5 (``MT5EncoderModel`` by the config's ``model_type``) over at most ``model.text_max_length`` tokens,
    masked (upstream pads to 512 and masks the padding in cross-attention: the same embeddings)."""
    from frameloom.models.text import T5TextEncoder
    from frameloom.pipeline import text_encoder_dir

    return T5TextEncoder.from_pretrained(
        text_encoder_dir(cfg),
        max_length=cfg.model.text_max_length or 512,  # null: Open-Sora-Plan's 512
        dtype=_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
    ).to(device)


def build_objective(cfg: Config):
    """Open-Sora-Plan's DDPM recipe from ``objective.*`` (the preset sets v-prediction, zero terminal SNR,
    min-SNR 5, explicit_uniform)."""
    from frameloom.objectives import ddpm_objective_from_config

    if cfg.objective.name not in (None, "ddpm"):  # null: the family's own
        raise FrameloomError(
            f"model.family opensora_plan trains with objective.name=ddpm, not {cfg.objective.name!r} "
            "(Open-Sora-Plan's flow-matching option is not implemented)"
        )
    return ddpm_objective_from_config(cfg)


def sample_videos(model: torch.nn.Module, text_encoder, codec, cfg: Config, prompts, seeds) -> torch.Tensor:
    """``frameloom sample`` / validation: the DDPM samplers (``sample.scheduler``, EulerAncestral by default)."""
    from frameloom.sampling.ddpm_generate import ddpm_videos

    return ddpm_videos(model, text_encoder, codec, cfg, prompts, seeds)


def export_released(cfg: Config, weights: dict[str, torch.Tensor], out: str | os.PathLike) -> list[Path]:
    """Write ``weights`` as a released ``OpenSoraT2V_v1_3`` folder in ``out`` (``config.json`` with the
    constructor arguments + ``diffusion_pytorch_model.safetensors``), which upstream's
    ``OpenSoraT2V_v1_3.from_pretrained`` and frameloom's ``model.pretrained`` load. Verified by loading it
    back strictly and comparing every tensor."""
    # the codec's and text encoder's widths, as at training time, read off the weights
    latent = int(weights["pos_embed.proj.weight"].shape[1])
    text = int(weights["caption_projection.linear_1.weight"].shape[1])
    model = build_denoiser(cfg.model, latent, text)
    load_state_strict(model, weights, "the checkpoint")
    state = model.state_dict()
    folder = write_folder(out, DIT_CLASS, model.config.to_dict(), state)
    reloaded = load_denoiser(folder).state_dict()
    for key, value in state.items():
        if not torch.equal(value.cpu(), reloaded[key].to(value.dtype)):
            raise FrameloomError(f"export check failed: {key} differs after loading {folder} back")
    return [folder]
