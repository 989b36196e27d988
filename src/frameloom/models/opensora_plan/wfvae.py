"""WF-VAE (wavelet-flow VAE) of Open-Sora-Plan v1.3: 4x temporal, 8x8 spatial compression, causal in time.

Li et al., "WF-VAE: Enhancing Video VAE by Wavelet-Driven Energy Flow for Latent Video Diffusion Model", 2024;
code: PKU-YuanGroup/Open-Sora-Plan ``opensora/models/causalvideovae/model/vae/modeling_wfvae.py`` and
``modules/``. Module names equal upstream's, so the released ``vae/diffusion_pytorch_model.safetensors`` loads
by key (released.py).

Encoder (video ``(B, 3, T, H, W)``, ``T = 4k + 1``):
1. a 3D Haar transform (8 subbands, causal: the first frame is repeated once) -> 24 channels, T/2, H/2;
2. its low-pass band goes through a 2D Haar (level 1) and again a 3D Haar (level 2); each is lifted by a conv
   (``connect_l1`` / ``connect_l2``) and concatenated into the main path (the "energy flow");
3. main path: conv + 2D resnets + stride-2 conv (level 1), conv + 3D resnets + stride-2 causal conv (level 2),
   mid (resnet, per-frame attention, resnet), norm, SiLU, causal conv -> mean and log-variance
   (``2 * latent_dim`` channels) at ``(1 + k, H/8, W/8)``.
Decoder: the mirror image, with inverse Haar transforms, a 2x temporal upsampling (``t_interpolation``) at
level 2 and the two wavelet branches added back before each inverse transform.

Causal convolutions pad the first frame (``kernel - 1`` copies) in front. Chunked ("tiled") encode/decode, as
upstream's ``enable_tiling``: the encoder takes the first frame, then 8 frames at a time; the decoder the first
latent frame, then 2 at a time, each chunk with one latent frame of lookahead (dropped afterwards: the
temporal interpolation needs its right neighbour), every causal convolution carrying the frames it still
needs from the previous chunk. With ``norm_type: layernorm`` (per position) chunked and whole-clip results are
equal up to float rounding; GroupNorm's statistics span the chunk. Upstream's chunked decode omits the
lookahead for the second-to-last chunk when the latent length is even (e.g. 24 latent frames = 93 video
frames), which changes those frames (measured 11.1 max abs difference at tiny size); frameloom always keeps
it, so its chunked decode equals the whole-clip decode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError

__all__ = ["WFVAE", "WFVAEConfig", "chunk_bounds"]


@dataclass
class WFVAEConfig:
    """``WFVAEModel`` constructor arguments (the released ``vae/config.json``'s keys; upstream defaults)."""

    latent_dim: int = 8
    base_channels: int = 128
    encoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 64
    decoder_num_resblocks: int = 2
    decoder_energy_flow_hidden_size: int = 128
    attention_type: str = "AttnBlock3DFix"
    use_attention: bool = True
    dropout: float = 0.0
    norm_type: str = "groupnorm"
    t_interpolation: str = "nearest"
    connect_res_layer_num: int = 1
    scale: list[float] = field(default_factory=lambda: [0.18215] * 8)
    shift: list[float] = field(default_factory=lambda: [0.0] * 8)
    l1_dowmsample_block: str = "Downsample"
    l1_downsample_wavelet: str = "HaarWaveletTransform2D"
    l2_dowmsample_block: str = "Spatial2xTime2x3DDownsample"
    l2_downsample_wavelet: str = "HaarWaveletTransform3D"
    l1_upsample_block: str = "Upsample"
    l1_upsample_wavelet: str = "InverseHaarWaveletTransform2D"
    l2_upsample_block: str = "Spatial2xTime2x3DUpsample"
    l2_upsample_wavelet: str = "InverseHaarWaveletTransform3D"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WFVAEConfig:
        known = {f.name for f in fields(cls)}
        clean = {k: v for k, v in values.items() if not str(k).startswith("_")}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise FrameloomError(f"WF-VAE config: unknown keys {unknown}")
        cfg = cls(**clean)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        defaults = WFVAEConfig()
        for name in (
            "attention_type",
            "l1_dowmsample_block",
            "l1_downsample_wavelet",
            "l2_dowmsample_block",
            "l2_downsample_wavelet",
            "l1_upsample_block",
            "l1_upsample_wavelet",
            "l2_upsample_block",
            "l2_upsample_wavelet",
        ):
            if getattr(self, name) != getattr(defaults, name):
                raise FrameloomError(
                    f"WF-VAE config: {name} {getattr(self, name)!r} is not supported (v1.3 uses the default)"
                )
        if self.norm_type not in ("groupnorm", "layernorm"):
            raise FrameloomError(
                f"WF-VAE config: norm_type must be groupnorm or layernorm, not {self.norm_type!r}"
            )
        if self.t_interpolation not in ("nearest", "trilinear"):
            raise FrameloomError(
                f"WF-VAE config: t_interpolation must be nearest or trilinear, not {self.t_interpolation!r}"
            )
        if len(self.scale) != self.latent_dim or len(self.shift) != self.latent_dim:
            raise FrameloomError(f"WF-VAE config: scale and shift need {self.latent_dim} values (latent_dim)")


def chunk_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """Upstream's ``build_chunk_start_end``: ``[0, 1)``, then ``size`` frames at a time."""
    bounds, start = [(0, 1)], 1
    while start < length:
        end = min(length, start + size)
        bounds.append((start, end))
        start = end
    return bounds


# -------------------------------------------------------------------------------------------------------- layers


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D ``fn`` to every frame of ``(B, C, T, H, W)`` (upstream's ``video_to_image``)."""
    if x.dim() != 5:
        return fn(x)
    b, _, t, _, _ = x.shape
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B T, C, H, W)
    return y.unflatten(0, (b, t)).transpose(1, 2)


class _Streaming(nn.Module):
    """A layer with state across the chunks of a chunked encode/decode."""

    stream: bool = False

    def reset_stream(self, enabled: bool) -> None:
        self.stream = enabled
        self.cache = None


class CausalConv3d(_Streaming):
    """``nn.Conv3d`` (as ``.conv``) after repeating the first frame ``kernel_t - 1`` times in front (no
    temporal padding otherwise). Streaming: the next chunk continues from the ``kernel_t - stride_t`` frames
    it still needs (taken before the last ``cache_offset`` frames, which the next chunk repeats)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple,
        stride: int | tuple = 1,
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        kernel = kernel if isinstance(kernel, tuple) else (kernel,) * 3
        stride = stride if isinstance(stride, tuple) else (stride,) * 3
        self.kt, self.st = kernel[0], stride[0]
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=(0, padding, padding), bias=bias)
        self.cache_offset = 0
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            front = x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
        else:
            front = self.cache
        x = torch.cat([front, x], dim=2)
        if self.stream:
            keep = max(self.kt - self.st, 0)
            src = x[:, :, : x.shape[2] - self.cache_offset]
            self.cache = src[:, :, src.shape[2] - keep :].clone()
        return self.conv(x)


class _LayerNorm(nn.Module):
    """LayerNorm over channels at every position (upstream ``LayerNorm``, keys ``.norm.*``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _normalize(channels: int, norm_type: str) -> nn.Module:
    if norm_type == "layernorm":
        return _LayerNorm(channels)
    return nn.GroupNorm(32, channels, eps=1e-6)


class _Conv2d(nn.Conv2d):
    """A 2D convolution applied to every frame of a video."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(super().forward, x)


class ResnetBlock2D(nn.Module):
    """Per-frame resnet: norm, SiLU, conv3x3, norm, SiLU, conv3x3 (+ 1x1 shortcut when widths differ)."""

    def __init__(self, c_in: int, c_out: int, norm_type: str):
        super().__init__()
        self.norm1 = _normalize(c_in, norm_type)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _normalize(c_out, norm_type)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(self._forward, x)


class ResnetBlock3D(nn.Module):
    """Causal 3D resnet (``CausalConv3d`` 3x3x3)."""

    def __init__(self, c_in: int, c_out: int, norm_type: str):
        super().__init__()
        self.norm1 = _normalize(c_in, norm_type)
        self.conv1 = CausalConv3d(c_in, c_out, 3, padding=1)
        self.norm2 = _normalize(c_out, norm_type)
        self.conv2 = CausalConv3d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = CausalConv3d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock3DFix(nn.Module):
    """Single-head self-attention over the pixels of each frame (upstream ``AttnBlock3DFix``)."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        self.norm = _normalize(channels, norm_type)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, t, hh, ww = x.shape

        def tokens(z: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B T, 1, H W, C)
            return z.permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Per-frame stride-2 conv3x3 after padding right and bottom by one."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(lambda z: self.conv(F.pad(z, (0, 1, 0, 1))), x)


class Upsample(nn.Module):
    """Per-frame nearest 2x upsampling then conv3x3."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(lambda z: self.conv(F.interpolate(z, scale_factor=2.0, mode="nearest")), x)


class Spatial2xTime2x3DDownsample(nn.Module):
    """Causal stride-2 conv3x3x3 (time, height, width) after padding right and bottom by one."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = CausalConv3d(c_in, c_out, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 0)))


class Spatial2xTime2x3DUpsample(_Streaming):
    """2x in time (all frames but the first, ``t_interpolation``) and 2x in space (trilinear), then a causal
    conv3x3x3. Streaming: each chunk starts with the previous chunk's last frame before its lookahead (the
    first chunk: its last frame, which reproduces the whole-clip boundary), whose two outputs are dropped."""

    def __init__(self, c_in: int, c_out: int, t_interpolation: str):
        super().__init__()
        self.t_interpolation = t_interpolation
        self.conv = CausalConv3d(c_in, c_out, 3, padding=1)
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream and self.cache is not None:  # a later chunk
            x = torch.cat([self.cache, x], dim=2)
            self.cache = x[:, :, -2:-1].clone()
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode=self.t_interpolation)[:, :, 2:]
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear")
        else:
            if self.stream:
                self.cache = x[:, :, -1:].clone()
            if x.shape[2] > 1:
                first, rest = x[:, :, :1], x[:, :, 1:]
                rest = F.interpolate(rest, scale_factor=(2, 1, 1), mode=self.t_interpolation)
                x = torch.cat(
                    [
                        F.interpolate(first, scale_factor=(1, 2, 2), mode="trilinear"),
                        F.interpolate(rest, scale_factor=(1, 2, 2), mode="trilinear"),
                    ],
                    dim=2,
                )
            else:
                x = F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear")
        return self.conv(x)


# -------------------------------------------------------------------------------------------------------- wavelets

_HAAR = 0.3536  # upstream's rounded 1 / sqrt(8): the released weights were trained with it
_SIGNS_3D = {  # (t, h, w) sign patterns of the 8 subbands, in upstream's order
    "h": [[[1, 1], [1, 1]], [[1, 1], [1, 1]]],
    "g": [[[1, -1], [1, -1]], [[1, -1], [1, -1]]],
    "hh": [[[1, 1], [-1, -1]], [[1, 1], [-1, -1]]],
    "gh": [[[1, -1], [-1, 1]], [[1, -1], [-1, 1]]],
    "h_v": [[[1, 1], [1, 1]], [[-1, -1], [-1, -1]]],
    "g_v": [[[1, -1], [1, -1]], [[-1, 1], [-1, 1]]],
    "hh_v": [[[1, 1], [-1, -1]], [[-1, -1], [1, 1]]],
    "gh_v": [[[1, -1], [-1, 1]], [[-1, 1], [1, -1]]],
}
_SIGNS_2D = {
    "aa": [[1, 1], [1, 1]],
    "ad": [[1, 1], [-1, -1]],
    "da": [[1, -1], [1, -1]],
    "dd": [[1, -1], [-1, 1]],
}


def haar_3d_filters() -> dict[str, torch.Tensor]:
    """The 8 filters ``(1, 1, 2, 2, 2)`` of the 3D Haar transform (sign pattern x 0.3536)."""
    return {k: torch.tensor(v, dtype=torch.float32).view(1, 1, 2, 2, 2) * _HAAR for k, v in _SIGNS_3D.items()}


def haar_2d_filters() -> dict[str, torch.Tensor]:
    """The 4 filters ``(1, 1, 2, 2)`` of the 2D Haar transform (sign pattern / 2)."""
    return {k: torch.tensor(v, dtype=torch.float32).view(1, 1, 2, 2) / 2 for k, v in _SIGNS_2D.items()}


class HaarWaveletTransform3D(nn.Module):
    """``(B, C, T, H, W)`` -> ``(B, 8 C, (T + 1) / 2, H / 2, W / 2)``: 8 fixed causal convs (kernel 2, stride 2;
    the first frame repeated once), subband-major channel order. Filters are frozen parameters (upstream)."""

    def __init__(self):
        super().__init__()
        for name, f in haar_3d_filters().items():
            conv = CausalConv3d(1, 1, 2, stride=2, bias=False)
            conv.conv.weight.data.copy_(f)
            conv.requires_grad_(False)
            setattr(self, f"{name}_conv", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        flat = x.flatten(0, 1).unsqueeze(1)  # (B C, 1, T, H, W)
        bands = [getattr(self, f"{name}_conv")(flat) for name in _SIGNS_3D]  # 8 x (B C, 1, T', H', W')
        return torch.cat([band.squeeze(1).unflatten(0, (b, -1)) for band in bands], dim=1)


class InverseHaarWaveletTransform3D(_Streaming):
    """``(B, 8 C, t, h, w)`` -> ``(B, C, 2 t - 1, 2 h, 2 w)`` (transposed convs of the 8 subbands, summed; the
    first frame, which the causal padding produced, dropped: in a chunked decode only in the first chunk)."""

    def __init__(self):
        super().__init__()
        for name, f in haar_3d_filters().items():
            self.register_buffer(name, f)
        self.cache = None

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        b = coeffs.shape[0]
        out = None
        for band, name in zip(coeffs.chunk(8, dim=1), _SIGNS_3D):
            y = F.conv_transpose3d(band.flatten(0, 1).unsqueeze(1), getattr(self, name), stride=2)
            out = y if out is None else out + y
        if not (self.stream and self.cache is not None):
            out = out[:, :, 1:]
        if self.stream:
            self.cache = True  # the first chunk has passed
        return out.squeeze(1).unflatten(0, (b, -1))


class HaarWaveletTransform2D(nn.Module):
    """Per-frame 2D Haar: ``(.., C, H, W)`` -> ``(.., 4 C, H / 2, W / 2)`` (subband-major)."""

    def __init__(self):
        super().__init__()
        for name, f in haar_2d_filters().items():
            self.register_buffer(name, f)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b * c, 1, h, w)
        bands = [F.conv2d(flat, getattr(self, n), stride=2).reshape(b, c, h // 2, w // 2) for n in _SIGNS_2D]
        return torch.cat(bands, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(self._forward, x)


class InverseHaarWaveletTransform2D(nn.Module):
    """Per-frame inverse 2D Haar: ``(.., 4 C, h, w)`` -> ``(.., C, 2 h, 2 w)``."""

    def __init__(self):
        super().__init__()
        for name, f in haar_2d_filters().items():
            self.register_buffer(name, f)

    def _forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        bands = coeffs.chunk(4, dim=1)
        b, c, h, w = bands[0].shape
        outs = [
            F.conv_transpose2d(band.reshape(b * c, 1, h, w), getattr(self, n), stride=2)
            for band, n in zip(bands, _SIGNS_2D)
        ]
        return (outs[0] + outs[1] + outs[2] + outs[3]).reshape(b, c, 2 * h, 2 * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(self._forward, x)


# -------------------------------------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        b, e, n, norm = (
            cfg.base_channels,
            cfg.encoder_energy_flow_hidden_size,
            cfg.encoder_num_resblocks,
            cfg.norm_type,
        )
        self.down1 = nn.Sequential(
            _Conv2d(24, b, 3, padding=1),
            *[ResnetBlock2D(b, b, norm) for _ in range(n)],
            Downsample(b, b),
        )
        self.down2 = nn.Sequential(
            _Conv2d(b + e, 2 * b, 3, padding=1),
            *[ResnetBlock3D(2 * b, 2 * b, norm) for _ in range(n)],
            Spatial2xTime2x3DDownsample(2 * b, 2 * b),
        )
        self.connect_l1 = _Conv2d(12, e, 3, padding=1)
        self.connect_l2 = _Conv2d(24, e, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(2 * b + e, 4 * b, norm), ResnetBlock3D(4 * b, 4 * b, norm)]
        if cfg.use_attention:
            mid.insert(1, AttnBlock3DFix(4 * b, norm))
        self.mid = nn.Sequential(*mid)
        self.norm_out = _normalize(4 * b, norm)
        self.conv_out = CausalConv3d(4 * b, 2 * cfg.latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWaveletTransform3D()
        self.wavelet_transform_l1 = HaarWaveletTransform2D()
        self.wavelet_transform_l2 = HaarWaveletTransform3D()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. wavelet pyramid of the video: (B, 24, T', H/2, W/2); level 1 (12 ch, H/4); level 2 (24 ch, H/8)
        coeffs = self.wavelet_transform_in(x)
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3])
        l2_coeffs = self.wavelet_transform_l2(l1_coeffs[:, :3])
        # 2. main path with the energy flow of each level concatenated in
        h = self.down1(coeffs)
        h = self.down2(torch.cat([h, self.connect_l1(l1_coeffs)], dim=1))
        h = self.mid(torch.cat([h, self.connect_l2(l2_coeffs)], dim=1))
        # 3. mean and log-variance (B, 2 z, t, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        b, e, n, norm = (
            cfg.base_channels,
            cfg.decoder_energy_flow_hidden_size,
            cfg.decoder_num_resblocks,
            cfg.norm_type,
        )
        self.energy = e
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * b, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(4 * b, 4 * b, norm), ResnetBlock3D(4 * b, 4 * b + e, norm)]
        if cfg.use_attention:
            mid.insert(1, AttnBlock3DFix(4 * b, norm))
        self.mid = nn.Sequential(*mid)
        self.up2 = nn.Sequential(
            *[ResnetBlock3D(4 * b, 4 * b, norm) for _ in range(n)],
            Spatial2xTime2x3DUpsample(4 * b, 4 * b, cfg.t_interpolation),
            ResnetBlock3D(4 * b, 4 * b + e, norm),
        )
        self.up1 = nn.Sequential(
            *[ResnetBlock3D(4 * b if i == 0 else 2 * b, 2 * b, norm) for i in range(n)],
            Upsample(2 * b, 2 * b),
            ResnetBlock3D(2 * b, 2 * b, norm),
        )
        self.layer = nn.Sequential(ResnetBlock3D(2 * b, b, norm), ResnetBlock3D(b, b, norm))
        k = cfg.connect_res_layer_num
        self.connect_l1 = nn.Sequential(
            *[ResnetBlock3D(e, e, norm) for _ in range(k)], _Conv2d(e, 12, 3, padding=1)
        )
        self.connect_l2 = nn.Sequential(
            *[ResnetBlock3D(e, e, norm) for _ in range(k)], _Conv2d(e, 24, 3, padding=1)
        )
        self.norm_out = _normalize(b, norm)
        self.conv_out = _Conv2d(b, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        e = self.energy
        # 1. latent -> features; the last e channels feed the level-2 wavelet branch
        h = self.mid(self.conv_in(z))
        l2 = self.inverse_wavelet_transform_l2(self.connect_l2(h[:, -e:]))  # (B, 3, 2t - 1, H/4, W/4)
        # 2. level 2 up (time and space); the last e channels feed the level-1 branch (+ level 2)
        h = self.up2(h[:, :-e])
        l1_coeffs = self.connect_l1(h[:, -e:])  # (B, 12, 2t - 1, H/4, W/4)
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs)  # (B, 3, 2t - 1, H/2, W/2)
        # 3. level 1 up (space), output subbands (+ level 1), inverse 3D Haar to pixels
        h = self.layer(self.up1(h[:, :-e]))
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 24, 2t - 1, H/2, W/2)
        h = torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1)
        return self.inverse_wavelet_transform_out(h)  # (B, 3, 4t - 3, H, W)


# -------------------------------------------------------------------------------------------------------- model


class WFVAE(nn.Module):
    """WF-VAE: ``encode(video) -> (mean, logvar)``, ``decode(z) -> video``; ``chunked = True`` processes
    time in chunks (``t_chunk_enc`` 8 video frames, ``t_chunk_dec`` 2 latent frames), as upstream's tiling."""

    def __init__(self, cfg: WFVAEConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg if cfg is not None else WFVAEConfig.from_dict(kwargs)
        cfg.check()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.chunked = False
        self.t_chunk_enc, self.t_chunk_dec = 8, 2
        # The decoder's chunks overlap by one latent frame: 1 frame at latent rate, 2 after the time upsampling.
        d = self.decoder
        for part in (d.conv_in, d.mid, d.connect_l2, d.up2):
            _set_offset(part, 1)
        for part in (d.up2[-2:], d.up1, d.connect_l1, d.layer):
            _set_offset(part, 2)

    def _stream(self, part: nn.Module, enabled: bool) -> None:
        for m in part.modules():
            if isinstance(m, _Streaming):
                m.reset_stream(enabled)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, T, H, W)`` in [-1, 1], ``T = 4k + 1``, ``H, W`` multiples of 8 -> mean, log-variance
        ``(B, z, k + 1, H / 8, W / 8)`` (log-variance clamped to [-30, 20])."""
        if not self.chunked:
            h = self.encoder(x)
        else:
            self._stream(self.encoder, True)
            try:
                h = torch.cat(
                    [self.encoder(x[:, :, s:e]) for s, e in chunk_bounds(x.shape[2], self.t_chunk_enc)], dim=2
                )
            finally:
                self._stream(self.encoder, False)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, z, t, h, w)`` -> video ``(B, 3, 4 t - 3, 8 h, 8 w)``."""
        if not self.chunked:
            return self.decoder(z)
        self._stream(self.decoder, True)
        try:
            t, out = z.shape[2], []
            for s, e in chunk_bounds(t, self.t_chunk_dec):
                if e < t:  # one latent frame of lookahead, whose 4 video frames are dropped
                    out.append(self.decoder(z[:, :, s : e + 1])[:, :, :-4])
                else:
                    out.append(self.decoder(z[:, :, s:e]))
            return torch.cat(out, dim=2)
        finally:
            self._stream(self.decoder, False)


def _set_offset(part: nn.Module, offset: int) -> None:
    for m in part.modules():
        if isinstance(m, CausalConv3d):
            m.cache_offset = offset
