"""Pyramid Flow's causal video VAE as a frameloom ``LatentCodec`` (so ``frameloom cache`` pre-extracts its
latents), with the per-variant latent normalisation of ``pyramid_dit_for_video_gen_pipeline.py``:

- first latent frame (and images): miniflux ``(z + 0.04) / 1.8726``, sd3 ``(z - 0.1490) / 1.8415``;
- every other latent frame: ``(z + 0.2343) / 3.0986``.

``normalize`` / ``denormalize`` are public because Pyramid Flow's own pre-extracted latent files hold the raw
VAE latents (``tools/extract_video_vae_latents.py``): frameloom normalises them when it reads them and writes
raw latents when it writes files for those tools.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from frameloom.errors import FrameloomError
from frameloom.models.codecs import LatentCodec, weights_sha256

from .loading import load_strict, read_config, read_weights
from .vae import CausalVideoVAE, VAEConfig

__all__ = ["NORMALIZATION", "PyramidVAECodec", "denormalize_latent", "normalize_latent"]

#: variant -> ((first-frame shift, scale), (other-frame shift, scale)); z_norm = (z - shift) * scale
NORMALIZATION = {
    "miniflux": ((-0.04, 1 / 1.8726), (-0.2343, 1 / 3.0986)),
    "sd3": ((0.1490, 1 / 1.8415), (-0.2343, 1 / 3.0986)),
}


def _constants(variant: str):
    if variant not in NORMALIZATION:
        raise FrameloomError(f"unknown Pyramid Flow variant {variant!r} (miniflux or sd3)")
    return NORMALIZATION[variant]


def normalize_latent(z: torch.Tensor, variant: str) -> torch.Tensor:
    """Raw VAE latent ``(B, C, T, h, w)`` -> what the transformer sees: frame 0 with the image constants, the
    others with the video ones (upstream ``get_vae_latent``)."""
    (s0, k0), (s1, k1) = _constants(variant)
    return torch.cat([(z[:, :, :1] - s0) * k0, (z[:, :, 1:] - s1) * k1], dim=2)


def denormalize_latent(z: torch.Tensor, variant: str) -> torch.Tensor:
    """Inverse of ``normalize_latent`` (upstream ``decode_latent``)."""
    (s0, k0), (s1, k1) = _constants(variant)
    return torch.cat([z[:, :, :1] / k0 + s0, z[:, :, 1:] / k1 + s1], dim=2)


class PyramidVAECodec(LatentCodec):
    """The frozen causal VAE, normalised per ``variant``. ``encode`` uses the posterior mean (or a sample with
    a generator); clips longer than ``chunk`` latent frames stream through in chunks (exact)."""

    def __init__(self, vae: CausalVideoVAE, variant: str, chunk: int = 2, tiling: bool = False):
        _constants(variant)
        self.tiling = bool(tiling)  # spatial tiles (approximate, as upstream); not part of the identity
        self.vae = vae.eval().requires_grad_(False)
        self.variant = variant
        self.chunk = int(chunk)
        self.latent_channels = vae.cfg.encoder_out_channels
        spatial = 2 ** sum(bool(s) for s in vae.cfg.encoder_spatial_down_sample)
        self.compression = (vae.temporal_factor, spatial, spatial)
        self.dtype = next(vae.parameters()).dtype
        self.device = next(vae.parameters()).device
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vae.cfg).items()}
        identity = {
            "codec": "pyramid-flow-causal-vae-v1",
            "variant": variant,  # the normalisation constants
            "config": cfg,
            "weights": weights_sha256(vae),
            "dtype": str(self.dtype),
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        variant: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> PyramidVAECodec:
        """Load a released ``causal_video_vae`` folder strictly by key."""
        folder = Path(folder)
        vae = CausalVideoVAE(VAEConfig.from_json(read_config(folder)))
        load_strict(vae, read_weights(folder), str(folder))
        codec = cls(vae.to(dtype), variant)
        if device is not None:
            codec.to(device)
        return codec

    def to(self, device: torch.device | str) -> PyramidVAECodec:
        self.vae.to(device)
        self.device = torch.device(device)
        return self

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return normalize_latent(z, self.variant)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return denormalize_latent(z, self.variant)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise FrameloomError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        ct, cs, _ = self.compression
        t, h, w = video.shape[2:]
        if (t - 1) % ct or h % cs or w % cs:
            raise FrameloomError(
                f"the Pyramid Flow VAE needs 1 + {ct}k frames and sides divisible by {cs}, got {t}x{h}x{w}"
            )
        x = video.to(self.device, self.dtype)
        encode = self.vae.tiled_encode if self.tiling else self.vae.encode
        mean, logvar = encode(x, chunk=self.chunk)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return self.normalize(mean.float())

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise FrameloomError(
                f"expected a latent of shape (B, {self.latent_channels}, t, h, w), got {tuple(latent.shape)}"
            )
        z = self.denormalize(latent.float()).to(self.device, self.dtype)
        decode = self.vae.tiled_decode if self.tiling else self.vae.decode
        return decode(z, chunk=self.chunk).float()
