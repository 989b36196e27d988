"""Open-Sora 2.0's video DC-AE (``dc-ae-f32t4c128``: 32x spatial, 4x temporal, 128 latent channels).

A deep-compression autoencoder (Chen et al., "Deep Compression Autoencoder for Efficient High-Resolution
Diffusion Models", 2024) extended to video with 3-D convolutions (hpcaitech/Open-Sora,
``opensora/models/dc_ae/models/dc_ae.py`` and ``nn/ops.py``; read, not copied). Parameter names are the
released checkpoint's (``encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight`` ...).

- Encoder: ``project_in`` (3x3x3 conv) -> 6 stages of blocks (ResBlock in the first 3, EfficientViT with
  ReLU linear attention + GLU MBConv in the last 3), each but the last ending in a stride-2 conv downsample
  (time too where ``temporal_downsample``) whose residual is a pixel-unshuffle + channel average -> ``project_out``
  (conv, residual: channel average) to the latent channels.
- Decoder: ``project_in`` (conv, residual: channel duplication) -> stages in reverse order, each but the last
  starting with a nearest-upsample + conv (residual: channel duplication + pixel shuffle) -> RMSNorm, ReLU, conv.
- Convolutions pad with zeros on every side (not causal): a latent frame covers 4 frames, T = 4 t. An image
  (T = 1) passes through without temporal down/upsampling. Norms are RMS over channels with weight and bias.

Latents are used divided by ``scaling_factor`` 0.493 (the codec does that, ``codecs.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCAEConfig", "VideoDCAE"]


@dataclass
class DCAEConfig:
    """``dc-ae-f32t4c128`` by default (Open-Sora's ``dc_ae_f32``)."""

    in_channels: int = 3
    latent_channels: int = 128
    encoder_widths: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    encoder_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 3, 3, 3])
    decoder_widths: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    decoder_depths: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3, 3])
    block_types: list[str] = field(default_factory=lambda: ["res", "res", "res", "vit", "vit", "vit"])
    """Per stage: ``res`` (ResBlock) or ``vit`` (EfficientViT block with 5x5x5 multi-scale attention)."""
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, False, False, True, True, False])
    """Per stage boundary (the decoder upsamples at the same ones)."""
    attention_head_dim: int = 32
    """Linear-attention head width (heads = channels / this)."""
    scaling_factor: float = 0.493

    def __post_init__(self) -> None:
        n = len(self.encoder_widths)
        lists = (self.encoder_depths, self.decoder_widths, self.decoder_depths, self.block_types)
        if any(len(x) != n for x in lists) or len(self.temporal_downsample) != n:
            raise ValueError("every DC-AE per-stage list must have one entry per stage")
        if any(b not in ("res", "vit") for b in self.block_types):
            raise ValueError(f"block_types entries must be res or vit, got {self.block_types}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_widths) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(x) for x in self.temporal_downsample[:-1])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# pixel (un)shuffles with channel averaging / duplication (the residual paths)


def unshuffle(x: torch.Tensor, temporal: bool) -> torch.Tensor:
    """``(B, C, T, H, W) -> (B, C r^d, T', H/2, W/2)``: 2x2 (or 2x2x2 with ``temporal``) neighbourhoods
    into channels, channel index ``c r^d + offset`` (``pixel_unshuffle_3d`` / per-frame ``pixel_unshuffle``)."""
    B, C, T, H, W = x.shape
    if temporal:
        x = x.reshape(B, C, T // 2, 2, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(B, C * 8, T // 2, H // 2, W // 2)
    return F.pixel_unshuffle(x.transpose(1, 2), 2).transpose(1, 2)


def shuffle(x: torch.Tensor, temporal: bool) -> torch.Tensor:
    """The inverse of :func:`unshuffle`."""
    B, C, T, H, W = x.shape
    if temporal:
        x = x.reshape(B, C // 8, 2, 2, 2, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(B, C // 8, T * 2, H * 2, W * 2)
    return F.pixel_shuffle(x.transpose(1, 2), 2).transpose(1, 2)


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Mean over consecutive groups of channels: ``(B, C, ...) -> (B, out, ...)``."""
    return x.unflatten(1, (out_channels, -1)).mean(2)


class AveragingShortcut(nn.Module):
    """Downsample residual: unshuffle (when ``factor`` 2) then average channel groups to ``out_channels``."""

    def __init__(self, out_channels: int, factor: int, temporal: bool) -> None:
        super().__init__()
        self.out_channels, self.factor, self.temporal = out_channels, factor, temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 2:
            x = unshuffle(x, self.temporal and x.shape[2] != 1)
        return channel_average(x, self.out_channels)


class DuplicatingShortcut(nn.Module):
    """Upsample residual: repeat each channel, then shuffle (when ``factor`` 2) to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.factor, self.temporal = (
            in_channels,
            out_channels,
            factor,
            temporal,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temporal = self.temporal and x.shape[2] != 1
        cells = 1 if self.factor == 1 else (8 if temporal else 4)
        x = x.repeat_interleave(self.out_channels * cells // self.in_channels, dim=1)
        return x if self.factor == 1 else shuffle(x, temporal)


# --------------------------------------------------------------------------------------------------------
# layers


class RMSNorm3d(nn.Module):
    """RMS over channels (eps 1e-5, in float32), then per-channel ``weight`` and ``bias``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / torch.sqrt(x.float().pow(2).mean(1, keepdim=True) + self.eps)).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class ConvLayer(nn.Module):
    """Zero-padded 3-D conv (``conv``), optional RMS norm (``norm``) and SiLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
        groups: int = 1,
        bias: bool = True,
        norm: bool = False,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = RMSNorm3d(cout) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.silu(x) if self.act else x


class Residual(nn.Module):
    """``main(x) + shortcut(x)`` (``shortcut`` None: identity)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class Sequence(nn.Module):
    """Modules applied in order, held as ``op_list`` (the released names)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResBlock(nn.Module):
    """conv (bias, SiLU) -> conv (no bias, RMS norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, act=True)
        self.conv2 = ConvLayer(channels, channels, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def relu_linear_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention (EfficientViT, Cai et al. 2023) over all T*H*W positions, in float32:
    ``out = (V' relu(K)^T) relu(Q)`` with V' = [V; 1], normalized by its last row.
    ``qkv`` ``(B, heads * 3 * hd, T, H, W)`` -> ``(B, heads * hd, T, H, W)``."""
    B, _, T, H, W = qkv.shape
    x = qkv.float().reshape(B, -1, 3 * head_dim, T * H * W)  # (B, heads, 3 hd, N)
    q, k, v = F.relu(x[:, :, :head_dim]), F.relu(x[:, :, head_dim : 2 * head_dim]), x[:, :, 2 * head_dim :]
    v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, heads, hd + 1, N)
    out = (v @ k.transpose(-1, -2)) @ q  # (B, heads, hd + 1, N)
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.reshape(B, -1, T, H, W).to(qkv.dtype)


class LiteMLA(nn.Module):
    """Multi-scale linear attention: 1x1 qkv, plus a 5x5x5 depthwise + grouped 1x1 aggregation of it; both
    attended; 1x1 projection with RMS norm."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        heads = channels // head_dim
        self.head_dim = head_dim
        self.qkv = ConvLayer(channels, 3 * channels, kernel=1, bias=False)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(3 * channels, 3 * channels, 5, padding=2, groups=3 * channels, bias=False),
                    nn.Conv3d(3 * channels, 3 * channels, 1, groups=3 * heads, bias=False),
                )
            ]
        )
        self.proj = ConvLayer(2 * channels, channels, kernel=1, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)  # (B, 6 C, T, H, W)
        return self.proj(relu_linear_attention(qkv, self.head_dim))


class GLUMBConv(nn.Module):
    """1x1 expansion (SiLU) -> depthwise 3x3x3 -> gated by SiLU of its second half -> 1x1 (RMS norm)."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        mid = channels * expand
        self.inverted_conv = ConvLayer(channels, 2 * mid, kernel=1, act=True)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, groups=2 * mid)
        self.point_conv = ConvLayer(mid, channels, kernel=1, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * F.silu(gate))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, head_dim))
        self.local_module = Residual(GLUMBConv(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class InterpolateConv(nn.Module):
    """Nearest 2x upsampling (time too when ``temporal`` and T > 1), then a 3x3x3 conv."""

    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = ConvLayer(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = (2 if self.temporal and x.shape[2] != 1 else 1, 2, 2)
        return self.conv(F.interpolate(x, scale_factor=factor, mode="nearest"))


def _block(kind: str, channels: int, head_dim: int) -> nn.Module:
    return Residual(ResBlock(channels)) if kind == "res" else EfficientViTBlock(channels, head_dim)


# --------------------------------------------------------------------------------------------------------
# the autoencoder


class Encoder(nn.Module):
    def __init__(self, c: DCAEConfig) -> None:
        super().__init__()
        widths, n = c.encoder_widths, len(c.encoder_widths)
        self.project_in = ConvLayer(c.in_channels, widths[0])
        stages = []
        for i, (width, depth) in enumerate(zip(widths, c.encoder_depths)):
            ops = [_block(c.block_types[i], width, c.attention_head_dim) for _ in range(depth)]
            if i < n - 1:
                stride = (2 if c.temporal_downsample[i] else 1, 2, 2)
                down = ConvLayer(width, widths[i + 1], stride=stride)
                ops.append(Residual(down, AveragingShortcut(widths[i + 1], 2, c.temporal_downsample[i])))
            stages.append(Sequence(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = Residual(
            Sequence([ConvLayer(widths[-1], c.latent_channels)]),
            AveragingShortcut(c.latent_channels, 1, False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    def __init__(self, c: DCAEConfig) -> None:
        super().__init__()
        widths, n = c.decoder_widths, len(c.decoder_widths)
        self.project_in = Residual(
            ConvLayer(c.latent_channels, widths[-1]),
            DuplicatingShortcut(c.latent_channels, widths[-1], 1, False),
        )
        stages = []
        for i, (width, depth) in enumerate(zip(widths, c.decoder_depths)):
            ops: list[nn.Module] = []
            if i < n - 1:
                temporal = c.temporal_downsample[i]
                up = InterpolateConv(widths[i + 1], width, temporal)
                ops.append(Residual(up, DuplicatingShortcut(widths[i + 1], width, 2, temporal)))
            ops += [_block(c.block_types[i], width, c.attention_head_dim) for _ in range(depth)]
            stages.append(Sequence(ops))
        self.stages = nn.ModuleList(stages)  # stage i at index i; run from the last to the first
        self.project_out = Sequence([RMSNorm3d(widths[0]), nn.ReLU(), ConvLayer(widths[0], c.in_channels)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


class VideoDCAE(nn.Module):
    """``encode(video (B, 3, T, H, W)) -> raw latent (B, C, T/4, H/32, W/32)`` and ``decode`` back; one sample
    at a time (batch statistics never mix). Scaling and tiling are the codec's (``codecs.DCAECodec``)."""

    def __init__(self, config: DCAEConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if config is not None else DCAEConfig(**kwargs)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(x[i : i + 1]) for i in range(x.shape[0])])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.decoder(z[i : i + 1]) for i in range(z.shape[0])])
