"""WF-VAE as a frameloom latent codec (``LatentCodec``): what ``frameloom cache``, training and sampling use.

Normalization as upstream's ``WFVAEModelWrapper``: ``z = (sample - shift) * scale`` per channel with the
config's ``shift`` / ``scale`` lists, inverted before decoding. Encoding returns the posterior mean (or a
sample drawn from ``generator``): frameloom caches one latent per clip, where upstream draws a new posterior
sample at every step (``vae.encode(x).sample()``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from frameloom.models.codecs import CodecError, LatentCodec, config_sha256, weights_sha256
from frameloom.models.opensora_plan.released import WFVAE_CLASS, load_state_strict, read_config, read_weights
from frameloom.models.opensora_plan.wfvae import WFVAE, WFVAEConfig

__all__ = ["WFVAECodec", "load_wfvae"]


def load_wfvae(folder: str | os.PathLike) -> WFVAE:
    """A released WF-VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) -> ``WFVAE``,
    loaded strictly (the fixed wavelet filters may be absent from the file)."""
    cfg = WFVAEConfig.from_dict(read_config(folder, WFVAE_CLASS))
    model = WFVAE(cfg)
    constants = frozenset(k for k in model.state_dict() if "wavelet_transform" in k)
    load_state_strict(model, read_weights(folder), f"WF-VAE weights in {folder}", optional=constants)
    return model.eval().requires_grad_(False)


class WFVAECodec(LatentCodec):
    """A frozen WF-VAE: ``(B, 3, T, H, W)`` video (``T = 4k + 1``, ``H, W`` multiples of 8) <-> normalized
    latents ``(B, latent_dim, k + 1, H / 8, W / 8)``. ``tiling`` turns on the chunked encode/decode."""

    compression = (4, 8, 8)

    def __init__(self, vae: WFVAE):
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = vae.config.latent_dim
        self.shift = torch.tensor(vae.config.shift, dtype=torch.float32)
        self.scale = torch.tensor(vae.config.scale, dtype=torch.float32)
        self.dtype = next(vae.parameters()).dtype
        self.device = next(vae.parameters()).device
        identity = {
            "codec": "wfvae-v1",
            "config": config_sha256(vae.config.to_dict()),
            "weights": weights_sha256(vae),
            "dtype": str(self.dtype),
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tiling: bool = False,
    ) -> WFVAECodec:
        if not Path(folder).is_dir():
            raise CodecError(f"model.codec: WF-VAE folder not found: {folder}")
        codec = cls(load_wfvae(folder).to(dtype))  # identity hashed on CPU, before any move
        codec.vae.chunked = bool(tiling)
        if device is not None:
            codec.to(device)
        return codec

    def to(self, device: torch.device | str) -> WFVAECodec:
        self.vae.to(device)
        self.device = torch.device(device)
        return self

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1, 1, 1, 1)
        return self.shift.to(like).view(view), self.scale.to(like).view(view)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise CodecError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        _, _, t, h, w = video.shape
        if (t - 1) % 4 or h % 8 or w % 8:
            raise CodecError(f"WF-VAE needs 4k + 1 frames and sizes divisible by 8, got {t} x {h} x {w}")
        mean, logvar = self.vae.encode(video.to(self.device, self.dtype))
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
            z = mean + torch.exp(0.5 * logvar) * noise
        shift, scale = self._stats(z)
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise CodecError(
                f"expected a latent of shape (B, {self.latent_channels}, t, h, w), got {tuple(latent.shape)}"
            )
        z = latent.to(self.device, self.dtype)
        shift, scale = self._stats(z)
        return self.vae.decode(z / scale + shift).float()
