"""The one list of model families.

A family bundles the functions the trainer, cache and sampler need (DESIGN.md, "Conventions"): load the
condition model (text encoder), the latent model (codec), the denoiser, and its objective. The optional hooks
default to the generic ones (`model.codec`, `model.text_encoder`, `objective.name`), which the native `dit`
family uses; families loaded from a diffusers directory supply their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def _dit() -> Family:
    from frameloom.models.dit.family import build_denoiser, load_denoiser

    return Family("dit", build_denoiser, load_denoiser)


FAMILIES: dict[str, Callable[[], Family]] = {"dit": _dit}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FrameloomError(f"unknown model.family {name!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()
