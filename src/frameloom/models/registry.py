"""The one list of model families.

A family bundles the functions the trainer, cache and sampler need (DESIGN.md, "Conventions"): load the
condition model (text encoder), the latent model (codec), and the denoiser. Later families (cogvideox, wan,
ltx_video) register here with the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from frameloom.config.schema import ModelConfig
from frameloom.errors import FrameloomError


@dataclass(frozen=True)
class Family:
    name: str
    build_denoiser: Callable[[ModelConfig, int, int], torch.nn.Module]
    """(model config, latent channels, text dim) -> trainable denoiser (from `pretrained` or `config`)."""
    load_denoiser: Callable[[str], torch.nn.Module]
    """A saved denoiser directory -> module."""


def _dit() -> Family:
    from frameloom.models.dit.family import build_denoiser, load_denoiser

    return Family("dit", build_denoiser, load_denoiser)


FAMILIES: dict[str, Callable[[], Family]] = {"dit": _dit}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FrameloomError(f"unknown model.family {name!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()
