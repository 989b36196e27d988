"""Open-Sora 2.0's two autoencoders as frameloom codecs (``LatentCodec``), so ``frameloom cache`` pre-extracts
their latents unchanged.

- **HunyuanVideo VAE** (4x temporal causal, 8x spatial, 16 channels, latents ``0.476986 z``): diffusers'
  ``AutoencoderKLHunyuanVideo``, whose parameter names are the released ``hunyuan_vae.safetensors``'s (checked
  against Open-Sora's ``AutoencoderKLCausal3D`` at tiny size: the same 184 keys, outputs within 3e-7).
  ``model.codec`` is a diffusers ``save_pretrained`` folder or the released single file (built with the
  released config, ``model.config.autoencoder_config`` overriding it, loaded strictly). Tiled encode/decode
  is diffusers' (``model.vae_tiling``). Encoding takes the posterior's mode (Open-Sora samples it per step;
  a cache holds one latent per clip).
- **Video DC-AE** ``f32t4c128`` (``dc_ae.VideoDCAE``; 4x temporal, 32x spatial, 128 channels, latents
  ``z / 0.493``), loaded strictly from its released file. Tiled as Open-Sora tiles it (``DCAECodec``):
  256-pixel spatial and 32-frame temporal tiles with 25% overlap, linearly blended.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frameloom.models.codecs import (
    CodecError,
    DiffusersVAECodec,
    LatentCodec,
    config_sha256,
    weights_sha256,
)

from .dc_ae import DCAEConfig, VideoDCAE
from .weights import load_strict, read_state_dict

__all__ = [
    "HUNYUAN_VAE_CONFIG",
    "DCAECodec",
    "TileSpec",
    "blend_tiles",
    "load_dc_ae",
    "load_hunyuan_vae",
    "tiled",
]

#: The released HunyuanVideo VAE's constructor arguments (diffusers ``AutoencoderKLHunyuanVideo`` defaults).
HUNYUAN_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.476986,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
}


def load_hunyuan_vae(
    path: str | os.PathLike,
    *,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    tiling: bool = False,
    slicing: bool = False,
) -> DiffusersVAECodec:
    """The HunyuanVideo VAE codec from a diffusers folder or the released ``hunyuan_vae.safetensors``."""
    from diffusers import AutoencoderKLHunyuanVideo

    path = Path(path)
    if path.is_dir():
        codec = DiffusersVAECodec.from_pretrained(
            path, dtype=dtype, device=device, tiling=tiling, slicing=slicing
        )
        if codec.class_name != "AutoencoderKLHunyuanVideo":
            raise CodecError(f"model.codec {path}: a {codec.class_name}, not an AutoencoderKLHunyuanVideo")
        return codec
    if not path.is_file():
        raise CodecError(
            f"model.codec: no HunyuanVideo VAE at {path} (a diffusers folder or a .safetensors file)"
        )
    vae = AutoencoderKLHunyuanVideo(**{**HUNYUAN_VAE_CONFIG, **(overrides or {})})
    load_strict(vae, read_state_dict(path), source=str(path))
    codec = DiffusersVAECodec(vae.to(dtype))
    if device is not None:
        codec.to(device)
    if tiling:
        codec.enable_tiling()
    if slicing:
        codec.enable_slicing()
    return codec


# --------------------------------------------------------------------------------------------------------
# tiling (pure functions)


@dataclass(frozen=True)
class TileSpec:
    """Tiles of ``size`` input elements every ``size * (1 - overlap)`` along one dimension; outputs (``ratio``
    times smaller on encode, larger on decode) overlap by ``blend`` elements, blended linearly, and each keeps
    its first ``keep``. Open-Sora's DC-AE: 256 px (8 latents), 32 frames (8 latents), overlap 0.25."""

    size: int
    ratio: float
    overlap: float = 0.25

    @property
    def stride(self) -> int:
        return int(self.size * (1 - self.overlap))

    @property
    def out_size(self) -> int:
        return int(self.size * self.ratio)

    @property
    def blend(self) -> int:
        return int(self.out_size * self.overlap)

    def check(self, what: str) -> None:
        """The kept part of each output must be what the input stride covers, or tiles would not line up."""
        if self.stride * self.ratio != self.out_size - self.blend:
            raise CodecError(
                f"{what}: tiles of {self.size} with overlap {self.overlap} do not line up at compression "
                f"{self.ratio} (stride {self.stride} -> {self.stride * self.ratio}, kept {self.out_size - self.blend})"
            )


def blend_tiles(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """``b`` with its first ``extent`` slices along ``dim`` mixed with ``a``'s last: slice ``i`` is
    ``a[-extent + i] (1 - i / extent) + b[i] (i / extent)`` (Open-Sora's ``blend_v/h/t``)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, device=b.device, dtype=b.dtype) / extent  # (extent,)
    shape = [1] * b.dim()
    shape[dim] = extent
    w = w.view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int, spec: TileSpec
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` along ``dim`` and join the blended outputs (``fn`` keeps the
    dimension's index). An input no longer than one tile is passed through ``fn`` whole."""
    if x.shape[dim] <= spec.size:
        return fn(x)
    outs = [
        fn(x.narrow(dim, i, min(spec.size, x.shape[dim] - i))) for i in range(0, x.shape[dim], spec.stride)
    ]
    keep = spec.out_size - spec.blend
    joined = []
    for i, out in enumerate(outs):
        if i > 0:
            out = blend_tiles(outs[i - 1], out, spec.blend, dim)
        joined.append(out.narrow(dim, 0, min(keep, out.shape[dim])))
    return torch.cat(joined, dim=dim)


# --------------------------------------------------------------------------------------------------------
# the DC-AE codec


class DCAECodec(LatentCodec):
    """Open-Sora 2.0's video DC-AE: ``encode -> raw / scaling_factor``, ``decode(z * scaling_factor)``.

    With ``tiling``, time is cut into 32-frame tiles and space into 256-pixel tiles (25% overlap, linear
    blend), as Open-Sora runs it; tiling changes the latents (slightly), so it is part of ``identity``."""

    def __init__(
        self, model: VideoDCAE, *, tiling: bool = False, spatial_tile: int = 256, temporal_tile: int = 32
    ):
        self.model = model.eval().requires_grad_(False)
        c = model.config
        self.config = c
        self.scaling_factor = float(c.scaling_factor)
        self.latent_channels = c.latent_channels
        self.compression = (c.temporal_compression, c.spatial_compression, c.spatial_compression)
        self.causal = False  # a latent frame covers 4 frames; frame 0 has no latent of its own
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.tiling = bool(tiling)
        self.spatial_tile, self.temporal_tile = int(spatial_tile), int(temporal_tile)
        if self.tiling:
            for encode in (True, False):
                for spec, what in zip(self._specs(encode), ("temporal tile", "spatial tile")):
                    spec.check(what)
        identity = {
            "codec": "opensora2-dc-ae-v1",
            "config": config_sha256(c.to_dict()),
            "weights": weights_sha256(model),
            "dtype": str(self.dtype),
            "tiling": [self.spatial_tile, self.temporal_tile] if self.tiling else None,
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def to(self, device: torch.device | str) -> DCAECodec:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        ct, cs, _ = self.compression
        return -(-num_frames // ct), height // cs, width // cs  # ceil in time (stride-2 convs, zero padding)

    def _specs(self, encode: bool) -> tuple[TileSpec, TileSpec]:
        ct, cs, _ = self.compression
        t, s = TileSpec(self.temporal_tile, 1 / ct), TileSpec(self.spatial_tile, 1 / cs)
        if encode:
            return t, s
        return TileSpec(self.temporal_tile // ct, ct), TileSpec(self.spatial_tile // cs, cs)

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, encode: bool) -> torch.Tensor:
        if not self.tiling:
            return fn(x)
        t_spec, s_spec = self._specs(encode)

        def spatial(y: torch.Tensor) -> torch.Tensor:
            return tiled(lambda r: tiled(fn, r, 4, s_spec), y, 3, s_spec)  # rows (H), then columns (W)

        return tiled(spatial, x, 2, t_spec)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise CodecError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        z = self._run(self.model.encode, video.to(self.device, self.dtype), encode=True)
        return z / self.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise CodecError(
                f"expected a latent of shape (B, {self.latent_channels}, t, h, w), got {tuple(latent.shape)}"
            )
        z = latent.to(self.device, self.dtype) * self.scaling_factor
        return self._run(self.model.decode, z, encode=False)


def load_dc_ae(
    path: str | os.PathLike | None,
    *,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    tiling: bool = False,
) -> DCAECodec:
    """The DC-AE codec: ``dc_ae.DCAEConfig`` (``f32t4c128``, ``overrides`` on top) with the weights of the
    released file at ``path``, loaded strictly (``path`` None: random weights, for tests only)."""
    try:
        config = DCAEConfig(**(overrides or {}))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"model.config.autoencoder_config: {exc}") from None
    model = VideoDCAE(config)
    if path is not None:
        load_strict(model, read_state_dict(path), source=str(path))
    codec = DCAECodec(model.to(dtype), tiling=tiling)
    return codec.to(device) if device is not None else codec
