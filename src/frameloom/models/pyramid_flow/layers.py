"""Building blocks shared by Pyramid Flow's two transformers (miniflux and SD3), with the released checkpoints'
module names (diffusers' Flux / SD3 naming, as in jy0205/Pyramid-Flow ``pyramid_dit/*_modules``).

The sequence of one model call is ``[text; video]``: text tokens first (at time 0), then the video tokens of
the history clips (oldest first) and of the clip being denoised. ``TokenLayout`` holds each token's position
and validity; the attention mask (``attention_mask``) lets a query see a key when both are valid or both are
padding, and, with the temporal-causal flag, only keys at an earlier or equal frame (SEED_FACTS.md).

Ulysses sequence parallelism (Jacobs et al. 2023) is built in: ``SequenceSplit`` pads text and video to a
multiple of the group size, gives each rank a contiguous slice of both, and reorders the mask and RoPE table to
the order an all-to-all produces (rank-major ``[text_r; video_r]``), so the causal mask survives the
all-to-all unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError
from frameloom.parallel.sequence import all_to_all, gather_sequence

__all__ = [
    "AdaNormContinuous",
    "AdaNormZero",
    "AdaNormZeroSingle",
    "FeedForward",
    "RMSNorm",
    "SequenceSplit",
    "TimeTextEmbedding",
    "apply_rope",
    "attend",
    "attention_mask",
    "rope_table",
    "timestep_embedding",
]


# --------------------------------------------------------------------------------------------------------
# small pure functions


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``:
    ``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / (dim/2))``; ``(B,) -> (B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(pos: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Multi-axis RoPE angles (Flux ``EmbedND``): ``pos (S, n_axes)`` -> ``(S, sum(axes_dims) / 2, 2)`` holding
    (cos, sin) of ``pos_a * theta^(-2i / d_a)`` per axis a, axes concatenated along the frequency dimension
    (angles in float64, as upstream, stored as float32)."""
    parts = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)  # (d/2,)
        parts.append(pos[:, a].double()[:, None] * omega[None])  # (S, d/2)
    angles = torch.cat(parts, dim=-1)  # (S, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x_2i, x_2i+1)`` of ``x (B, h, S, hd)`` by the table's angles (Flux
    ``apply_rope``), in float32; returns ``x``'s dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, h, S, hd/2, 2)
    cos, sin = table[..., 0], table[..., 1]  # (S, hd/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention_mask(valid: torch.Tensor, frame: torch.Tensor | None) -> torch.Tensor:
    """``(B, 1, S, S)`` bool: a query sees a key when both are valid or both are padding (upstream's
    token-id equality, so padding rows never attend to nothing) and, when ``frame (S,)`` is given (temporal
    causal), the key's frame is <= the query's (text sits at frame 0)."""
    mask = valid[:, None, :, None] == valid[:, None, None, :]  # (B, 1, S, S)
    if frame is not None:
        mask = mask & (frame[:, None] >= frame[None, :])[None, None]
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: torch.Tensor | None,
    mask: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Masked SDPA over the joint sequence, ``(B, h, S_local, hd)`` in and out. Under sequence parallelism the
    heads are scattered and the sequence gathered first (all-to-all), so RoPE and the mask apply to the whole
    sequence in ``SequenceSplit``'s order; the output goes back to this rank's tokens."""
    if group is not None:
        q, k, v = (all_to_all(x, group, scatter_dim=1, gather_dim=2) for x in (q, k, v))  # (B, h/sp, S, hd)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h/sp, S, hd)
    if group is not None:
        out = all_to_all(out, group, scatter_dim=2, gather_dim=1)  # (B, h, S_local, hd)
    return out


# --------------------------------------------------------------------------------------------------------
# modules (parameter names = the released checkpoints')


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale (``weight``), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (all of the model's adaLN norms)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class AdaNormZero(nn.Module):
    """adaLN-Zero of a joint block (``norm1`` / ``norm1_context``): ``linear(silu(temb))`` gives
    (shift, scale, gate) for attention and for the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(temb))[:, None].chunk(
            6, dim=-1
        )
        return _layer_norm(x) * (1 + scale) + shift, gate, shift_mlp, scale_mlp, gate_mlp  # each (B, 1, D)


class AdaNormZeroSingle(nn.Module):
    """adaLN-Zero of a single-stream block (``norm``): (shift, scale, gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate = self.linear(F.silu(temb))[:, None].chunk(3, dim=-1)
        return _layer_norm(x) * (1 + scale) + shift, gate


class AdaNormContinuous(nn.Module):
    """``norm_out`` (and SD3's last ``norm1_context``): ``linear(silu(temb))`` gives (scale, shift), in that
    order."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return _layer_norm(x) * (1 + scale) + shift


class _GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``ff.net.{0.proj, 2}``: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D) (diffusers ``FeedForward``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _MLPEmbed(nn.Module):
    """``linear_1 -> silu -> linear_2`` (diffusers ``TimestepEmbedding`` / text projection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """``time_text_embed``: embedded timestep (256 sinusoids -> MLP) plus the projected pooled text vector."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = _MLPEmbed(256, dim)
        self.text_embedder = _MLPEmbed(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t).to(pooled.dtype)  # (B, 256)
        return self.timestep_embedder(emb) + self.text_embedder(pooled)  # (B, D)


# --------------------------------------------------------------------------------------------------------
# sequence parallelism


def enable_ulysses(model: nn.Module, group: dist.ProcessGroup, blocks: Sequence[nn.Module]) -> None:
    """Ulysses over ``group`` for either Pyramid Flow transformer: every block's attention scatters heads and
    gathers the sequence across the group, so its size must divide the heads."""
    sp = dist.get_world_size(group)
    if model.num_heads % sp:
        raise FrameloomError(f"parallel.sp_size={sp} does not divide the model's {model.num_heads} heads")
    model.sp_group = group
    for block in blocks:
        block.attn.sp_group = group


@dataclass
class SequenceSplit:
    """How one call's ``[text (L); video (N)]`` sequence is laid out over a sequence-parallel group.

    Text and video are each padded to a multiple of ``sp`` (padding is invalid, so no real token sees it);
    rank p keeps text ``[p L'/sp, (p+1) L'/sp)`` and video ``[p N'/sp, (p+1) N'/sp)``. ``order`` lists, for
    the sequence an all-to-all gathers (rank-major ``[text_p; video_p]``), each token's index in the padded
    ``[text; video]`` sequence; the mask and RoPE table are indexed with it."""

    group: dist.ProcessGroup | None
    sp: int
    rank: int
    text_len: int
    video_len: int
    text_pad: int
    video_pad: int

    @classmethod
    def build(cls, group: dist.ProcessGroup | None, text_len: int, video_len: int) -> SequenceSplit:
        sp = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        return cls(group, sp, rank, text_len, video_len, (-text_len) % sp, (-video_len) % sp)

    @property
    def active(self) -> bool:
        return self.group is not None and self.sp > 1

    def order(self, device: torch.device) -> torch.Tensor:
        lt, lv = self.text_len + self.text_pad, self.video_len + self.video_pad
        st, sv = lt // self.sp, lv // self.sp
        idx = [
            torch.cat([torch.arange(p * st, (p + 1) * st), lt + torch.arange(p * sv, (p + 1) * sv)])
            for p in range(self.sp)
        ]
        return torch.cat(idx).to(device)

    def pad_positions(self, text_pos: torch.Tensor, video_pos: torch.Tensor) -> torch.Tensor:
        """Positions ``(L', n)`` and ``(N', n)`` of the padded sequence, concatenated (padding at 0)."""
        tp = F.pad(text_pos, (0, 0, 0, self.text_pad))
        vp = F.pad(video_pos, (0, 0, 0, self.video_pad))
        return torch.cat([tp, vp])

    def pad_valid(self, text_valid: torch.Tensor, video_valid: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                F.pad(text_valid, (0, self.text_pad), value=False),
                F.pad(video_valid, (0, self.video_pad), value=False),
            ],
            dim=1,
        )

    def shard(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """This rank's slice of ``x (B, n, D)`` after zero-padding ``pad`` tokens."""
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        if not self.active:
            return x
        return x.chunk(self.sp, dim=1)[self.rank]

    def gather_video(self, x: torch.Tensor) -> torch.Tensor:
        """The whole video sequence ``(B, N, D)`` from this rank's slice (padding removed)."""
        if self.active:
            x = gather_sequence(x, self.group, dim=1)
        return x[:, : self.video_len]

    def arrange(self, table: torch.Tensor | None, mask: torch.Tensor | None):
        """RoPE table ``(S', ...)`` and mask ``(B, 1, S', S')`` in the all-to-all order."""
        if not self.active:
            return table, mask
        order = self.order(mask.device if mask is not None else table.device)
        if table is not None:
            table = table[order]
        if mask is not None:
            mask = mask[:, :, order][:, :, :, order]
        return table, mask
