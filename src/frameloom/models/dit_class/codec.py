"""fast-DiT's latents: ``vae.encode(x).latent_dist.sample() * 0.18215`` (SD-VAE ``AutoencoderKL``).

``DiffusersVAECodec`` encodes with the posterior's mode unless given a generator; fast-DiT's
``extract_features.py`` draws a sample. ``PosteriorSampleCodec`` draws it with a generator seeded from the
image's own pixels, so the cache stays a pure function of its content (re-encoding an unchanged image gives
the same latent on any machine and in any batch).
"""

from __future__ import annotations

import hashlib

import torch

from frameloom.models.codecs import DiffusersVAECodec
from frameloom.models.text import derive_identity

__all__ = ["PosteriorSampleCodec", "content_seed"]


def content_seed(pixels: torch.Tensor) -> int:
    """A 63-bit seed from a sample's pixels (quantized to 8 bits, so float noise in decoding cannot move it)."""
    q = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    digest = hashlib.blake2b(q.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PosteriorSampleCodec(DiffusersVAECodec):
    """An image VAE whose ``encode`` draws ``mean + std * z`` from the posterior, z seeded per sample by
    ``content_seed`` (or by ``generator`` when one is given)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        self.identity = derive_identity(self.identity, posterior="sample-content-seeded-v1")

    @classmethod
    def wrap(cls, codec: DiffusersVAECodec) -> PosteriorSampleCodec:
        out = cls.__new__(cls)
        out.__dict__.update(codec.__dict__)
        out.identity = derive_identity(codec.identity, posterior="sample-content-seeded-v1")
        return out

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None or self.is_video:
            return super().encode(video, generator)
        b, _, t, _, _ = video.shape
        x = video.to(self.device, self.dtype).permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*T, 3, H, W)
        dist = self.vae.encode(x).latent_dist
        z = torch.stack(
            [
                torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(content_seed(img)))
                for img in video.permute(0, 2, 1, 3, 4).flatten(0, 1)
            ]
        ).to(dist.mean.device, dist.mean.dtype)  # (B*T, C, h, w)
        latent = dist.mean + dist.std * z
        latent = latent.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
        return self.normalize(latent)
