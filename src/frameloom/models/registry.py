"""The one list of model families.

A family bundles the functions the trainer, cache and sampler need (DESIGN.md, "Conventions"): load the
condition model (text encoder), the latent model (codec), the denoiser, and its objective. The optional hooks
default to the generic ones (`model.codec`, `model.text_encoder`, `objective.name`), which the native `dit`
family uses; families loaded from a diffusers directory supply their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError


@dataclass(frozen=True)
class Family:
    name: str
    build_denoiser: Callable[[ModelConfig, int, int], torch.nn.Module]
    """(model config, latent channels, text dim) -> trainable denoiser (from `pretrained` or `config`)."""
    load_denoiser: Callable[[str], torch.nn.Module]
    """A saved denoiser directory -> module."""
    load_codec: Callable[[Config, torch.device], Any] | None = None
    """(config, device) -> frozen latent codec (PixelCodec / DiffusersVAECodec interface); None: generic."""
    load_text_encoder: Callable[[Config, torch.device], Any] | None = None
    """(config, device) -> frozen text encoder (T5TextEncoder interface); None: generic."""
    build_objective: Callable[[Config], Any] | None = None
    """config -> objective (frameloom.objectives.Objective); None: chosen by `objective.name`."""
    sample: Callable[..., torch.Tensor] | None = None
    """(model, text_encoder, codec, cfg, prompts, seeds) -> videos (N, 3, T, H, W) in [-1, 1]: the family's
    own sampler for `frameloom sample`; None: frameloom's flow Euler sampler."""
    validate: Callable[..., list] | None = None
    """(model, text_encoder, codec, cfg, out_dir) -> mp4 paths: `validation.prompts` through the family's
    diffusers pipeline built around the in-training weights; None: the generic sampler."""
    pipeline_class: Callable[[Config], type] | None = None
    """config -> the diffusers pipeline class (validation, LoRA/diffusers export); None: not a diffusers family."""
    comfyui_module: Callable[[str], str] | None = None
    """diffusers module path -> ComfyUI model key path (without `diffusion_model.`); None: the same path."""
    input_shapes: Callable[[Config], Any] | None = None
    """config -> the training inputs' shapes (``frameloom.memory.plan.InputShapes``: latent channels, VAE
    compression, text length and width) from configs alone, for ``frameloom plan``; None: read from the
    generic codec and text encoder."""
    describe_sampler: Callable[..., str] | None = None
    """(model, cfg) -> what `sample` integrates with (solver, steps, shift), for the log and the mp4
    metadata; None: frameloom's flow Euler."""
    default_fps: float = 8.0
    """The frame rate sampling uses when `sample.fps` is null (`sample_fps`): the mp4s' rate, and for a
    family whose denoiser takes a frame rate (LTX-Video) the rate it samples at."""


def _dit() -> Family:
    from frameloom.models.dit.family import build_denoiser, load_denoiser

    return Family("dit", build_denoiser, load_denoiser)


def _diffusers_family(name: str) -> Family:
    """A family loaded from a diffusers directory: the hooks its module `frameloom.models.<name>.family`
    defines under their names (`load_codec`, ..., `sample_videos`, `validate`, `comfyui_module`;
    docs/families.md). The pipeline class is the one `model_index.json` names."""
    import importlib

    m = importlib.import_module(f"frameloom.models.{name}.family")
    return Family(
        name,
        m.build_denoiser,
        m.load_denoiser,
        load_codec=m.load_codec,
        load_text_encoder=m.load_text_encoder,
        build_objective=m.build_objective,
        sample=m.sample_videos,
        validate=m.validate,
        pipeline_class=_pipeline_class,
        comfyui_module=m.comfyui_module,
        describe_sampler=m.describe_sampler,
        input_shapes=m.input_shapes,
        default_fps=float(getattr(m, "DEFAULT_FPS", 8.0)),
    )


def _native_family(name: str) -> Family:
    """A family whose denoiser frameloom implements (seed systems' released models): the hooks its module
    `frameloom.models.<name>.family` defines (`build_denoiser`, `load_denoiser` required; `load_codec`,
    `load_text_encoder`, `build_objective`, `sample_videos`, `validate`, `comfyui_module` optional)."""
    import importlib

    try:
        m = importlib.import_module(f"frameloom.models.{name}.family")
    except ModuleNotFoundError as exc:
        if exc.name != f"frameloom.models.{name}.family" and exc.name != f"frameloom.models.{name}":
            raise
        raise FrameloomError(f"model.family {name!r} is not available in this version of frameloom") from None
    return Family(
        name,
        m.build_denoiser,
        m.load_denoiser,
        load_codec=getattr(m, "load_codec", None),
        load_text_encoder=getattr(m, "load_text_encoder", None),
        build_objective=getattr(m, "build_objective", None),
        sample=getattr(m, "sample_videos", None),
        validate=getattr(m, "validate", None),
        comfyui_module=getattr(m, "comfyui_module", None),
        describe_sampler=getattr(m, "describe_sampler", None),
    )


def _pipeline_class(cfg: Config) -> type:
    from frameloom.models import diffusers_family as df

    return df.pipeline_class(df.check_pretrained(cfg.model, df.PARTS))


FAMILIES: dict[str, Callable[[], Family]] = {
    "dit": _dit,
    "cogvideox": partial(_diffusers_family, "cogvideox"),
    "wan": partial(_diffusers_family, "wan"),
    "ltx_video": partial(_diffusers_family, "ltx_video"),
    # the seed systems' own models (frameloom implementations that load their released weights)
    "pyramid_flow": partial(_native_family, "pyramid_flow"),
    "opensora2": partial(_native_family, "opensora2"),
    "opensora_plan": partial(_native_family, "opensora_plan"),
    "dit_class": partial(_native_family, "dit_class"),
}


def sample_fps(cfg: Config) -> float:
    """`sample.fps`, or the family's `default_fps` when it is null."""
    if cfg.sample.fps is not None:
        return float(cfg.sample.fps)
    return get_family(cfg.model.family).default_fps


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FrameloomError(f"unknown model.family {name!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()
