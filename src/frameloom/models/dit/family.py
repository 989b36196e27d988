"""The `dit` family: frameloom's own video DiT, built from a preset + config or loaded from a directory."""

from __future__ import annotations

from pathlib import Path

from frameloom.config.schema import ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.dit import DIT_PRESETS
from frameloom.models.dit.model import VideoDiT


def build_denoiser(cfg: ModelConfig, latent_channels: int, text_dim: int) -> VideoDiT:
    """`model.pretrained` directory if set, else preset (optional) + `model.config` overrides."""
    if cfg.pretrained:
        return load_denoiser(cfg.pretrained)
    kwargs = {}
    if cfg.preset is not None:
        if cfg.preset not in DIT_PRESETS:
            raise FrameloomError(f"unknown model.preset {cfg.preset!r}; available: {', '.join(DIT_PRESETS)}")
        kwargs.update(DIT_PRESETS[cfg.preset])
    kwargs.update(cfg.config)
    kwargs.setdefault("in_channels", latent_channels)
    kwargs.setdefault("text_dim", text_dim)
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    try:
        return VideoDiT(**kwargs)
    except TypeError as exc:
        raise FrameloomError(f"model.config: {exc}") from None


def load_denoiser(path: str | Path) -> VideoDiT:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FrameloomError(f"model.pretrained: no config.json in {path}")
    return VideoDiT.from_pretrained(str(path))
