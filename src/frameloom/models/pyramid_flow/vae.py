"""Pyramid Flow's causal video VAE (``CausalVideoVAE``, jy0205/Pyramid-Flow ``video_vae``): 3-D convolutions
that are causal in time (zero-padded in front, so frame i never sees a later frame), 8x spatial and 8x temporal
compression keeping the first frame on its own (121 frames -> 16 latents), 16 channels. Parameter names are
the released ``causal_video_vae`` checkpoint's.

Long clips are encoded and decoded in temporal chunks: every causal convolution keeps the frames it needs from
the previous chunk (``_Stream``), which gives exactly the whole-clip result (group norms and the mid-block
attention act per frame) at a fraction of the memory. Spatial tiling (overlapping tiles blended linearly, as
upstream) is optional and approximate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalVideoVAE", "VAEConfig"]


@dataclass
class VAEConfig:
    """The released ``causal_video_vae/config.json`` fields frameloom uses (defaults = released model)."""

    encoder_in_channels: int = 3
    encoder_out_channels: int = 16
    encoder_layers_per_block: Sequence[int] = (2, 2, 2, 2)
    encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512)
    encoder_spatial_down_sample: Sequence[bool] = (True, True, True, False)
    encoder_temporal_down_sample: Sequence[bool] = (True, True, True, False)
    encoder_norm_num_groups: int = 32
    decoder_in_channels: int = 16
    decoder_out_channels: int = 3
    decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3)
    decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512)
    decoder_spatial_up_sample: Sequence[bool] = (True, True, True, False)
    decoder_temporal_up_sample: Sequence[bool] = (True, True, True, False)
    decoder_norm_num_groups: int = 32
    downsample_scale: int = 8

    @classmethod
    def from_json(cls, values: dict) -> VAEConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in names})


class _Stream:
    """Per-convolution state of a chunked (streaming) pass: the last input frames of the previous chunk."""

    def __init__(self) -> None:
        self.cache: dict[int, torch.Tensor] = {}
        self.first = True


class CausalConv3d(nn.Module):
    """``*.conv``: a Conv3d whose time axis is zero-padded ``k_t - 1`` frames in front only (causal), with
    'same' spatial padding. In a chunked pass (``stream``), later chunks take the previous chunk's last frames
    instead of the zeros (for a stride-2 kernel 3: one frame), which reproduces the whole-clip output."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.space_pad = kernel // 2
        self.t_stride = stride[0]
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0)

    def forward(self, x: torch.Tensor, stream: _Stream | None = None) -> torch.Tensor:
        p = self.space_pad
        if stream is None or stream.first:
            x = F.pad(x, (p, p, p, p, self.time_pad, 0))  # (B, C, T + k - 1, H + 2p, W + 2p)
        else:
            x = F.pad(x, (p, p, p, p, 0, 0))
            keep = 1 if self.t_stride == 2 else self.time_pad  # frames the next output needs from before
            if keep:
                prev = stream.cache[id(self)]
                x = torch.cat([prev[:, :, prev.shape[2] - keep :], x], dim=2)
        if stream is not None and self.time_pad:
            stream.cache[id(self)] = x[:, :, -self.time_pad :]
        return self.conv(x)


class _FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of every frame on its own (upstream ``CausalGroupNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class _ResBlock(nn.Module):
    """``resnets.i``: norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus a 1x1x1 shortcut on a width change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _FrameGroupNorm(groups, cin, eps=1e-6)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = _FrameGroupNorm(groups, cout, eps=1e-6)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = CausalConv3d(cin, cout, kernel=1) if cin != cout else None

    def forward(self, x: torch.Tensor, stream: _Stream | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        skip = self.conv_shortcut(x, stream) if self.conv_shortcut is not None else x
        return skip + h


class _FrameAttention(nn.Module):
    """``attentions.0``: single-head self-attention over the pixels of each frame, group-normed, residual
    (diffusers ``Attention`` with ``_from_deprecated_attn_block``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        f = x.transpose(1, 2).reshape(b * t, c, h, w)
        y = self.group_norm(f).flatten(2).transpose(1, 2)  # (B*T, HW, C)
        q, k, v = (m(y)[:, None] for m in (self.to_q, self.to_k, self.to_v))  # (B*T, 1, HW, C)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(y.dtype)[:, 0]
        y = self.to_out[0](y).transpose(1, 2).reshape(b * t, c, h, w) + f
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_ResBlock(channels, channels, groups), _ResBlock(channels, channels, groups)]
        )
        self.attentions = nn.ModuleList([_FrameAttention(channels, groups)])

    def forward(self, x: torch.Tensor, stream: _Stream | None) -> torch.Tensor:
        x = self.resnets[0](x, stream)
        return self.resnets[1](self.attentions[0](x), stream)


class _Sampler(nn.Module):
    """``downsamplers.0`` / ``temporal_downsamplers.0`` / ``upsamplers.0`` / ``temporal_upsamplers.0``: a
    causal conv (strided to go down; widened then depth-to-space to go up)."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "down":
            self.conv = CausalConv3d(channels, channels, stride=(1, 2, 2))
        elif kind == "tdown":
            self.conv = CausalConv3d(channels, channels, stride=(2, 1, 1))
        elif kind == "up":
            self.conv = CausalConv3d(channels, channels * 4)
        else:
            self.conv = CausalConv3d(channels, channels * 2)

    def forward(self, x: torch.Tensor, stream: _Stream | None) -> torch.Tensor:
        y = self.conv(x, stream)
        if self.kind == "up":  # (B, C*4, T, H, W) -> (B, C, T, 2H, 2W)
            b, c4, t, h, w = y.shape
            y = (
                y.reshape(b, c4 // 4, 2, 2, t, h, w)
                .permute(0, 1, 4, 5, 2, 6, 3)
                .reshape(b, c4 // 4, t, 2 * h, 2 * w)
            )
        elif (
            self.kind == "tup"
        ):  # (B, C*2, T, H, W) -> (B, C, 2T, H, W); a clip's first frame stays one frame
            b, c2, t, h, w = y.shape
            y = y.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
            if stream is None or stream.first:
                y = y[:, :, 1:]
        return y


class _Stage(nn.Module):
    """``down_blocks.i`` / ``up_blocks.i``: residual blocks then the optional spatial and temporal samplers."""

    def __init__(
        self, cin: int, cout: int, layers: int, groups: int, spatial: bool, temporal: bool, up: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(_ResBlock(cin if i == 0 else cout, cout, groups) for i in range(layers))
        name_s, name_t = (
            ("upsamplers", "temporal_upsamplers") if up else ("downsamplers", "temporal_downsamplers")
        )
        kind_s, kind_t = ("up", "tup") if up else ("down", "tdown")
        setattr(self, name_s, nn.ModuleList([_Sampler(cout, kind_s)]) if spatial else None)
        setattr(self, name_t, nn.ModuleList([_Sampler(cout, kind_t)]) if temporal else None)
        self._names = (name_s, name_t)

    def forward(self, x: torch.Tensor, stream: _Stream | None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, stream)
        for name in self._names:
            samplers = getattr(self, name)
            if samplers is not None:
                x = samplers[0](x, stream)
        return x


class _Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = list(c.encoder_block_out_channels), c.encoder_norm_num_groups
        self.conv_in = CausalConv3d(c.encoder_in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            _Stage(
                ch[max(i - 1, 0)],
                ch[i],
                c.encoder_layers_per_block[i],
                g,
                c.encoder_spatial_down_sample[i],
                c.encoder_temporal_down_sample[i],
                up=False,
            )
            for i in range(len(ch))
        )
        self.mid_block = _MidBlock(ch[-1], g)
        self.conv_norm_out = _FrameGroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * c.encoder_out_channels)

    def forward(self, x: torch.Tensor, stream: _Stream | None = None) -> torch.Tensor:
        x = self.conv_in(x, stream)
        for block in self.down_blocks:
            x = block(x, stream)
        x = self.mid_block(x, stream)
        return self.conv_out(F.silu(self.conv_norm_out(x)), stream)


class _Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = list(c.decoder_block_out_channels), c.decoder_norm_num_groups
        rev = ch[::-1]
        self.conv_in = CausalConv3d(c.decoder_in_channels, ch[-1])
        self.mid_block = _MidBlock(ch[-1], g)
        self.up_blocks = nn.ModuleList(
            _Stage(
                rev[max(i - 1, 0)],
                rev[i],
                c.decoder_layers_per_block[i],
                g,
                c.decoder_spatial_up_sample[i],
                c.decoder_temporal_up_sample[i],
                up=True,
            )
            for i in range(len(ch))
        )
        self.conv_norm_out = _FrameGroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = CausalConv3d(ch[0], c.decoder_out_channels)

    def forward(self, z: torch.Tensor, stream: _Stream | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, stream), stream)
        for block in self.up_blocks:
            x = block(x, stream)
        return self.conv_out(F.silu(self.conv_norm_out(x)), stream)


class CausalVideoVAE(nn.Module):
    """Encoder, decoder, ``quant_conv`` and ``post_quant_conv``. ``encode`` returns the Gaussian posterior's
    (mean, logvar); ``decode`` returns pixels in about [-1, 1]. ``chunk`` (latent frames per chunk after the
    first) streams long clips through the network with the exact whole-clip result."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.cfg = config or VAEConfig()
        self.encoder = _Encoder(self.cfg)
        self.decoder = _Decoder(self.cfg)
        z = self.cfg.encoder_out_channels
        self.quant_conv = CausalConv3d(2 * z, 2 * z, kernel=1)
        self.post_quant_conv = CausalConv3d(z, z, kernel=1)
        self.temporal_factor = 2 ** sum(bool(b) for b in self.cfg.encoder_temporal_down_sample)

    def _run(self, x: torch.Tensor, fn, first: int, rest: int) -> torch.Tensor:
        """Apply ``fn(chunk, stream)`` to ``x``'s time axis in chunks of ``first`` then ``rest`` frames."""
        if x.shape[2] <= first:
            return fn(x, None)
        stream, out, start = _Stream(), [], 0
        for size in [first] + [rest] * ((x.shape[2] - first + rest - 1) // rest):
            out.append(fn(x[:, :, start : start + size], stream))
            stream.first = False
            start += size
        return torch.cat(out, dim=2)

    def encode(self, video: torch.Tensor, chunk: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Video ``(B, 3, T, H, W)`` in [-1, 1] (T = 1 + 8k) -> posterior (mean, logvar) ``(B, 16, 1 + k, H/8,
        W/8)``; frames go through in chunks of ``1 + chunk * 8`` then ``chunk * 8``."""
        f = self.temporal_factor
        moments = self._run(
            video, lambda v, s: self.quant_conv(self.encoder(v, s), s), 1 + chunk * f, chunk * f
        )
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        """Latent ``(B, 16, t, h, w)`` -> video ``(B, 3, 1 + (t - 1) * 8, 8h, 8w)``; latents go through in chunks
        of ``1 + chunk`` then ``chunk`` frames."""
        return self._run(z, lambda v, s: self.decoder(self.post_quant_conv(v, s), s), 1 + chunk, chunk)

    def tiled_encode(
        self, video: torch.Tensor, tile: int = 256, chunk: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` in overlapping ``tile`` x ``tile`` pixel tiles blended over a quarter tile (upstream
        ``tiled_encode``): bounded memory for large frames, approximately the untiled result."""
        f = 2 ** sum(bool(s) for s in self.cfg.encoder_spatial_down_sample)
        moments = _tiled(lambda x: torch.cat(self.encode(x, chunk), dim=1), video, tile, f, down=True)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def tiled_decode(self, z: torch.Tensor, tile: int = 32, chunk: int = 2) -> torch.Tensor:
        """``decode`` in overlapping ``tile`` x ``tile`` latent tiles (upstream ``tiled_decode``)."""
        f = 2 ** sum(bool(s) for s in self.cfg.decoder_spatial_up_sample)
        return _tiled(lambda x: self.decode(x, chunk), z, tile, f, down=False)


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """``b`` with its first ``extent`` rows (along ``dim``) faded in linearly from ``a``'s last ones:
    ``b_i = a_{-extent+i} (1 - i/extent) + b_i i/extent`` (upstream ``blend_v`` / ``blend_h``)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, dtype=b.dtype, device=b.device) / extent
    shape = [1] * b.ndim
    shape[dim] = extent
    w = w.view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tiled(fn, x: torch.Tensor, tile: int, factor: int, down: bool) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x (B, C, T, H, W)`` (stride 3/4 tile) and blend the seams
    over a quarter of an output tile; ``factor`` is the spatial scale of ``fn`` (down or up)."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    stride = int(tile * 3 / 4)
    out_tile = tile // factor if down else tile * factor
    extent, keep = out_tile // 4, out_tile - out_tile // 4
    rows = [
        [fn(x[..., i : i + tile, j : j + tile]) for j in range(0, w, stride)] for i in range(0, h, stride)
    ]
    result = []
    for i, row in enumerate(rows):
        line = []
        for j, t in enumerate(row):
            if i > 0:
                t = blend(rows[i - 1][j], t, extent, dim=3)
            if j > 0:
                t = blend(row[j - 1], t, extent, dim=4)
            line.append(t[..., :keep, :keep])
        result.append(torch.cat(line, dim=4))
    return torch.cat(result, dim=3)
