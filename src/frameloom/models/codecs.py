"""Latent codecs: what turns pixels into the tensors a diffusion transformer denoises, and back.

Every codec has the same small interface (``LatentCodec``) so that the cache, the trainer and the sampler
never care which one is in use:

- ``identity``: a stable text that changes whenever the codec would produce different latents (its config,
  its weights, the dtype it runs in). The latent cache keys on it, so swapping the VAE re-encodes exactly the
  video entries and nothing has to be deleted by hand.
- ``latent_channels`` and ``compression`` ``(t, h, w)``: how the latent grid relates to the pixel grid.
- ``encode(video) -> latent`` and ``decode(latent) -> video``; ``video`` is float ``(B, 3, T, H, W)`` in
  ``[-1, 1]`` and ``latent`` is ``(B, C, t, h, w)``, already normalized the way the family's denoiser expects.

Two codecs exist: ``PixelCodec`` (no compression: the DiT patches pixels directly, which is what the
quickstart's tiny model does) and ``DiffusersVAECodec`` (any diffusers ``AutoencoderKL*`` model in a local
directory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frameloom.errors import FrameloomError

__all__ = [
    "LatentCodec",
    "PixelCodec",
    "DiffusersVAECodec",
    "CodecError",
    "weights_sha256",
    "config_sha256",
]


class CodecError(FrameloomError):
    """A codec that cannot be loaded or used (missing directory, unknown class, wrong input shape)."""


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's ``state_dict`` tensors, in sorted key order.

    For every entry the key, the dtype, the shape and the raw bytes of the tensor (as stored) are hashed.
    Hashing the tensors rather than the checkpoint files was chosen because (1) the result does not depend on
    how the weights were saved (one file or shards, safetensors or ``.bin``), (2) it reflects the dtype the
    weights are actually used in (fp32 weights loaded as bf16 give different latents, hence a different
    identity), and (3) it also covers modules built in memory that were never saved.
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # A uint8 view is valid for every dtype (including bfloat16, which numpy cannot represent).
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_sha256(config: Any) -> str:
    """sha256 of a JSON-serializable config; keys starting with ``_`` (paths, library versions) are dropped.

    Those private keys (``_name_or_path``, ``_diffusers_version``, ``_use_default_values``, ...) change when
    the same model is saved elsewhere or with another library version, which must not invalidate a cache.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    clean = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    text = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class LatentCodec(ABC):
    """The interface every codec follows (see the module docstring).

    Subclasses set ``identity``, ``latent_channels`` and ``compression`` and implement ``encode``/``decode``.
    ``device``/``dtype`` say where the codec computes; ``encode``/``decode`` move their input there.
    """

    identity: str
    latent_channels: int
    compression: tuple[int, int, int]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float video ``(B, 3, T, H, W)`` in ``[-1, 1]`` -> normalized latent ``(B, C, t, h, w)``."""

    @abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent ``(B, C, t, h, w)`` -> float video ``(B, 3, T, H, W)`` in about ``[-1, 1]``."""

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The latent grid ``(t, h, w)`` for a clip of ``num_frames`` x ``height`` x ``width`` pixels.

        Video VAEs are causal in time (the first frame is encoded alone), hence ``1 + (T - 1) // t``.
        """
        ct, ch, cw = self.compression
        t = num_frames if ct == 1 else 1 + (num_frames - 1) // ct
        return t, height // ch, width // cw

    def to(self, device: torch.device | str) -> LatentCodec:
        """Move the codec's weights (if any) to ``device``; returns ``self``."""
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(identity={self.identity[:12]}..., channels={self.latent_channels}, "
            f"compression={self.compression})"
        )


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise CodecError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")


class PixelCodec(LatentCodec):
    """The identity codec: the "latent" is the video itself, 3 channels, no compression.

    Used by frameloom's own DiT when it patches pixels directly (the quickstart's tiny model), so that the
    same cache/trainer path works without any VAE.
    """

    identity = "pixel-v1"
    latent_channels = 3
    compression = (1, 1, 1)

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.device = torch.device("cpu")
        if dtype != torch.float32:
            # The stored values differ with the dtype, so the cache must tell them apart.
            self.identity = f"pixel-v1-{str(dtype).removeprefix('torch.')}"

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_video(video)
        return video.to(self.device, self.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        _check_video(latent)
        return latent.float()


def _own_copy(values: Any) -> torch.Tensor | None:
    """A private fp32 CPU copy of per-channel statistics (``_stats`` casts it per latent), or None."""
    if values is None:
        return None
    return torch.as_tensor(values).detach().to("cpu", torch.float32).flatten().clone()


def _compression_from_model(vae: nn.Module, is_video: bool) -> tuple[int, int, int] | None:
    """Derive ``(t, h, w)`` from the model's attributes/config without running it, or None if unknown."""
    cfg = vae.config
    # Instance attributes only: diffusers' ConfigMixin would otherwise answer ``getattr`` from the config,
    # where e.g. CogVideoX's ``temporal_compression_ratio`` is the nominal ratio, not what the model does.
    attrs = vars(vae)
    spatial = attrs.get("spatial_compression_ratio")  # LTX-Video, Wan, Mochi, HunyuanVideo...
    if spatial is None and cfg.get("scale_factor_spatial") is not None:
        spatial = cfg["scale_factor_spatial"]
    if spatial is None and cfg.get("block_out_channels") is not None:
        # AutoencoderKL / CogVideoX-style encoders downsample once between consecutive blocks.
        spatial = 2 ** (len(cfg["block_out_channels"]) - 1)
    if not is_video:
        return (1, int(spatial), int(spatial)) if spatial else None

    if type(vae).__name__ == "AutoencoderKLCogVideoX":
        # CogVideoX halves time in the first log2(ratio) blocks that have a downsampler (all but the last),
        # so a shallow (tiny) model compresses time less than its configured ratio.
        levels = int(math.log2(cfg["temporal_compression_ratio"]))
        temporal = 2 ** min(levels, len(cfg["down_block_types"]) - 1)
    else:
        temporal = attrs.get("temporal_compression_ratio")  # LTX-Video, Mochi, HunyuanVideo...
        if temporal is None and cfg.get("scale_factor_temporal") is not None:
            temporal = cfg["scale_factor_temporal"]  # Wan
    if spatial is None or temporal is None:
        return None
    return int(temporal), int(spatial), int(spatial)


class DiffusersVAECodec(LatentCodec):
    """A frozen diffusers ``AutoencoderKL``-family VAE (CogVideoX, Wan, LTX-Video, image ``AutoencoderKL``).

    Normalization (applied after encoding, inverted before decoding), in this order, each when present:

    1. per-channel ``latents_mean``/``latents_std`` (from the config, as Wan and Mochi have them, or from the
       model's buffers, as LTX-Video has them): ``z = (z - mean) / std``;
    2. ``shift_factor``/``scaling_factor`` from the config: ``z = (z - shift_factor) * scaling_factor``.

    This reproduces each family's pipeline: CogVideoX ``z * 1.15258426``; SD3/Flux ``(z - shift) * scale``;
    Wan ``(z - mean) / std``; LTX ``(z - mean) * scale / std``. (CogVideoX's ``invert_scale_latents`` concerns
    the image-conditioning latents of its I2V pipeline only and is left to that family's code.)

    Image VAEs (only 2-D convolutions) encode every frame on its own: ``T`` is folded into the batch.
    Tiling/slicing change memory use, not the model, and are not part of ``identity``.
    """

    def __init__(self, vae: nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.class_name = type(vae).__name__
        self.is_video = any(isinstance(m, nn.Conv3d) for m in vae.modules())
        cfg = vae.config
        self.latent_channels = int(cfg.get("latent_channels") or cfg.get("z_dim"))
        self.dtype = next(vae.parameters()).dtype
        self.device = next(vae.parameters()).device

        # Normalization constants (see the class docstring).
        self.scaling_factor = cfg.get("scaling_factor")
        self.shift_factor = cfg.get("shift_factor")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        buffers = dict(vae.named_buffers(recurse=False))  # not getattr: it falls back to the config
        if mean is None and "latents_mean" in buffers and "latents_std" in buffers:
            mean, std = buffers["latents_mean"], buffers["latents_std"]
        self.latents_mean = _own_copy(mean)
        self.latents_std = _own_copy(std)
        for name, value in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
            if value is not None and value.numel() != self.latent_channels:
                raise CodecError(
                    f"{name} has {value.numel()} values, the VAE has {self.latent_channels} channels"
                )

        compression = _compression_from_model(vae, self.is_video)
        self.compression = compression if compression is not None else self._probe_compression()

        # Everything that changes the latents: the class, its config, the weights, the dtype.
        identity = {
            "codec": "diffusers-vae-v1",
            "class": self.class_name,
            "config": config_sha256(cfg),
            "weights": weights_sha256(vae),
            "dtype": str(self.dtype),
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        tiling: bool = False,
        slicing: bool = False,
    ) -> DiffusersVAECodec:
        """Load a VAE saved with ``save_pretrained`` from a local directory (never downloads).

        The class is read from ``config.json``'s ``_class_name`` and looked up in ``diffusers`` by name; any
        ``AutoencoderKL*`` class is accepted.
        """
        import diffusers

        root = Path(directory)
        folder = root / subfolder if subfolder else root
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise CodecError(
                f"no VAE config at {config_file} (expected a diffusers save_pretrained directory)"
            )
        try:
            class_name = json.loads(config_file.read_text())["_class_name"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CodecError(f"{config_file}: cannot read _class_name ({exc})") from None
        model_cls = getattr(diffusers, class_name, None) if class_name.startswith("AutoencoderKL") else None
        if model_cls is None:
            raise CodecError(
                f"{config_file}: _class_name {class_name!r} is not a diffusers AutoencoderKL-family model "
                "(e.g. AutoencoderKLCogVideoX, AutoencoderKLWan, AutoencoderKLLTXVideo, AutoencoderKL)"
            )
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
        if subfolder:
            kwargs["subfolder"] = subfolder
        try:
            vae = model_cls.from_pretrained(str(root), **kwargs)
        except (OSError, ValueError) as exc:
            raise CodecError(f"cannot load {class_name} from {folder}: {exc}") from None
        codec = cls(vae)  # identity is computed here, on CPU, before any move
        if device is not None:
            codec.to(device)
        if tiling:
            codec.enable_tiling()
        if slicing:
            codec.enable_slicing()
        return codec

    def to(self, device: torch.device | str) -> DiffusersVAECodec:
        self.vae.to(device)
        self.device = torch.device(device)
        return self

    def enable_tiling(self) -> bool:
        """Turn on the model's tiled encode/decode if it has one; returns whether it did."""
        if hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling()
            return True
        return False

    def enable_slicing(self) -> bool:
        """Turn on the model's per-sample (sliced) encode/decode if it has one; returns whether it did."""
        if hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
            return True
        return False

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.latents_mean is None:
            return None
        shape = (1, -1) + (1,) * (like.ndim - 2)  # broadcast over (B, C, ...)
        mean = self.latents_mean.to(like.device, like.dtype).view(shape)
        std = self.latents_std.to(like.device, like.dtype).view(shape)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the normalized latent the denoiser sees (see the class docstring)."""
        stats = self._stats(z)
        if stats is not None:
            z = (z - stats[0]) / stats[1]
        if self.shift_factor is not None:
            z = z - self.shift_factor
        if self.scaling_factor is not None:
            z = z * self.scaling_factor
        return z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``."""
        if self.scaling_factor is not None:
            z = z / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        stats = self._stats(z)
        if stats is not None:
            z = z * stats[1] + stats[0]
        return z

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode with the latent distribution's mode, or a sample drawn with ``generator`` when given."""
        _check_video(video)
        b, _, t, _, _ = video.shape
        x = video.to(self.device, self.dtype)
        if not self.is_video:
            x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*T, 3, H, W)
        dist = self.vae.encode(x).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator=generator)
        if not self.is_video:
            z = z.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise CodecError(
                f"expected a latent of shape (B, {self.latent_channels}, t, h, w), got {tuple(latent.shape)}"
            )
        b, _, t, _, _ = latent.shape
        z = self.denormalize(latent.to(self.device, self.dtype))
        if not self.is_video:
            z = z.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*t, C, h, w)
        video = self.vae.decode(z).sample
        if not self.is_video:
            video = video.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        return video

    def _probe_compression(self, frames: int = 9, size: int = 64) -> tuple[int, int, int]:
        """Fallback for an unknown family: encode a small dummy clip and read the ratios off the shapes.

        9 frames at 64x64 give exact ratios for temporal factors dividing 8 and spatial factors dividing 64.
        """
        frames = frames if self.is_video else 1
        dummy = torch.zeros(1, 3, frames, size, size)
        with torch.no_grad():
            x = dummy.to(self.device, self.dtype)
            if not self.is_video:
                x = x[:, :, 0]
            z = self.vae.encode(x).latent_dist.mode()
        spatial = size // z.shape[-1]
        temporal = (frames - 1) // (z.shape[2] - 1) if self.is_video and z.shape[2] > 1 else 1
        return int(temporal), int(spatial), int(spatial)
