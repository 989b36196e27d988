"""Pyramid Flow's miniflux transformer (``PyramidFluxTransformer``, jy0205/Pyramid-Flow
``pyramid_dit/flux_modules``): a Flux-style MMDiT with joint (double-stream) and single-stream blocks, RMS
qk-norm, 3-axis RoPE over (frame, row, column) and adaLN conditioning on timestep + pooled CLIP-L. Parameter
names are the released ``diffusion_transformer_*`` checkpoints' (SEED_MODELS.md).

One call denoises one clip ``x`` given its history clips (AR: the earlier units, coarser the older), all
concatenated into one sequence after the text; only ``x``'s tokens are returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError

from .layers import (
    AdaNormContinuous,
    AdaNormZero,
    AdaNormZeroSingle,
    FeedForward,
    RMSNorm,
    SequenceSplit,
    TimeTextEmbedding,
    attend,
    attention_mask,
    enable_ulysses,
    rope_table,
)

__all__ = ["PyramidFluxTransformer", "flux_positions", "patchify", "unpatchify"]

PATCH = 2  # upstream hard-codes the 2x2 patch of the miniflux model (its config says patch_size 1)


def patchify(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """``(B, C, T, H, W) -> (B, T*(H/p)*(W/p), p*p*C)``, tokens in (t, h, w) order, features (p1, p2, c)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, t: int, h: int, w: int, p: int = PATCH) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, t*h*w, p*p*C) -> (B, C, t, h*p, w*p)`` (h, w in tokens)."""
    b = x.shape[0]
    x = x.reshape(b, t, h, w, p, p, -1)  # (B, t, h, w, p1, p2, C)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, t, h * p, w * p)


def _interp_positions(size: int, full: int) -> torch.Tensor:
    """Positions of ``size`` tokens spread over a ``full``-token axis (upstream: linear interpolation of
    ``arange(full)`` to ``size`` points, align_corners=False), float32 ``(size,)``."""
    if size == full:
        return torch.arange(full, dtype=torch.float32)
    return F.interpolate(torch.arange(full, dtype=torch.float32)[None, None], size, mode="linear")[0, 0]


def flux_positions(shapes: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """(frame, row, column) of every video token of clips with token grids ``shapes`` [(t, h, w), ...] (oldest
    first, the denoised clip last): frames count on across clips from 0, rows and columns of coarser clips are
    interpolated onto the last clip's grid (upstream ``_prepare_pyramid_image_ids``). ``(N, 3)`` float32."""
    _, full_h, full_w = shapes[-1]
    out, start = [], 0
    for t, h, w in shapes:
        tt = torch.arange(start, start + t, dtype=torch.float32)
        hh, ww = _interp_positions(h, full_h), _interp_positions(w, full_w)
        grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij"), dim=-1)  # (t, h, w, 3)
        out.append(grid.reshape(-1, 3))
        start += t
    return torch.cat(out)


class _JointAttention(nn.Module):
    """Attention of a double-stream block: video (``to_*``) and text (``add_*_proj``) projections, RMS qk-norm
    per stream, one masked attention over ``[text; video]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_k_proj, self.add_v_proj, self.add_q_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.sp_group: dist.ProcessGroup | None = None  # set by enable_sequence_parallel

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))  # (B, n, h, hd)

    def forward(self, vid, txt, rope, mask):
        lt = txt.shape[1]
        q = torch.cat(
            [self.norm_added_q(self._heads(self.add_q_proj(txt))), self.norm_q(self._heads(self.to_q(vid)))],
            1,
        )
        k = torch.cat(
            [self.norm_added_k(self._heads(self.add_k_proj(txt))), self.norm_k(self._heads(self.to_k(vid)))],
            1,
        )
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(vid))], 1)  # (B, S, h, hd)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rope, mask, self.sp_group)
        out = out.transpose(1, 2).flatten(2)  # (B, S, inner)
        return self.to_out[0](out[:, lt:]), self.to_add_out(out[:, :lt])


class _SingleAttention(nn.Module):
    """Attention of a single-stream block over the concatenated sequence (no output projection: the block's
    ``proj_out`` takes attention and MLP together)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.sp_group: dist.ProcessGroup | None = None

    def forward(self, x, rope, mask):
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, self.head_dim)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, self.head_dim)))
        v = self.to_v(x).unflatten(-1, (self.heads, self.head_dim))  # (B, S, h, hd)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rope, mask, self.sp_group)
        return out.transpose(1, 2).flatten(2)  # (B, S, inner)


class FluxDoubleBlock(nn.Module):
    """``transformer_blocks.i``: adaLN-Zero per stream, joint attention, per-stream MLPs."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(dim)
        self.norm1_context = AdaNormZero(dim)
        self.attn = _JointAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, vid, txt, temb, rope, mask):
        # 1. modulation of both streams
        nv, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(vid, temb)
        nt, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(txt, temb)
        # 2. joint attention
        attn_v, attn_t = self.attn(nv, nt, rope, mask)
        vid = vid + gate * attn_v
        txt = txt + c_gate * attn_t
        # 3. MLPs
        vid = vid + gate_mlp * self.ff(
            F.layer_norm(vid, (vid.shape[-1],), eps=1e-6) * (1 + scale_mlp) + shift_mlp
        )
        nt = F.layer_norm(txt, (txt.shape[-1],), eps=1e-6) * (1 + c_scale_mlp) + c_shift_mlp
        txt = txt + c_gate_mlp * self.ff_context(nt)
        return vid, txt


class FluxSingleBlock(nn.Module):
    """``single_transformer_blocks.i``: one stream ``[text; video]``, attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = _SingleAttention(dim, heads, head_dim)

    def forward(self, x, temb, rope, mask):
        nx, gate = self.norm(x, temb)
        mlp = F.gelu(self.proj_mlp(nx), approximate="tanh")
        out = self.proj_out(torch.cat([self.attn(nx, rope, mask), mlp], dim=-1))
        return x + gate * out


class PyramidFluxTransformer(nn.Module):
    """The miniflux DiT. ``forward(x, t, text, text_mask, pooled, history=None)``:

    - ``x`` ``(B, C, T, H, W)``: the latent clip being denoised (H, W even);
    - ``t`` ``(B,)``: model timesteps (Pyramid Flow's stage slices of 1000..1);
    - ``text`` ``(B, L, joint_attention_dim)`` T5 tokens, ``text_mask`` ``(B, L)``;
    - ``pooled`` ``(B, pooled_projection_dim)``: the CLIP-L pooled vector;
    - ``history``: earlier clips ``(B, C, t_i, h_i, w_i)``, oldest first, same batch.

    Returns the velocity for ``x``, ``(B, C, T, H, W)``.
    """

    variant = "miniflux"

    def __init__(
        self,
        in_channels: int = 64,
        num_layers: int = 8,
        num_single_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 30,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: Sequence[int] = (16, 24, 24),
        temporal_causal: bool = True,
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise FrameloomError(
                f"model.config: axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim "
                f"{attention_head_dim}"
            )
        if in_channels % (PATCH * PATCH):
            raise FrameloomError(f"model.config: in_channels {in_channels} must be latent channels x 4")
        self.config = {
            "in_channels": in_channels,
            "num_layers": num_layers,
            "num_single_layers": num_single_layers,
            "attention_head_dim": attention_head_dim,
            "num_attention_heads": num_attention_heads,
            "joint_attention_dim": joint_attention_dim,
            "pooled_projection_dim": pooled_projection_dim,
            "axes_dims_rope": list(axes_dims_rope),
            "temporal_causal": temporal_causal,
        }
        dim = num_attention_heads * attention_head_dim
        self.num_heads = num_attention_heads
        self.latent_channels = in_channels // (PATCH * PATCH)
        self.axes_dims = tuple(axes_dims_rope)
        self.temporal_causal = temporal_causal
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxDoubleBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)
        )
        self.norm_out = AdaNormContinuous(dim)
        self.proj_out = nn.Linear(dim, in_channels)
        self.sp_group: dist.ProcessGroup | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier linears, N(0, 0.02) conditioning, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (
            *self.time_text_embed.timestep_embedder.children(),
            *self.time_text_embed.text_embedder.children(),
        ):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.context_embedder.weight, std=0.02)
        zero = [self.norm_out.linear, self.proj_out]
        zero += [m for b in self.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
        zero += [b.norm.linear for b in self.single_transformer_blocks]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def enable_sequence_parallel(self, group: dist.ProcessGroup) -> None:
        """Ulysses over ``group`` (frameloom.parallel.parallelize calls this when parallel.sp_size > 1)."""
        enable_ulysses(self, group, (*self.transformer_blocks, *self.single_transformer_blocks))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled: torch.Tensor,
        history: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        clips = [*(history or []), x]
        b, _, tx, hx, wx = x.shape
        shapes = [(c.shape[2], c.shape[3] // PATCH, c.shape[4] // PATCH) for c in clips]
        # 1. conditioning: timestep + pooled text (B, D); text tokens (B, L, D)
        temb = self.time_text_embed(t, pooled)
        txt = self.context_embedder(text)
        # 2. video tokens of every clip, oldest first: (B, N, D)
        vid = self.x_embedder(torch.cat([patchify(c) for c in clips], dim=1))
        # 3. positions (text at 0), validity, mask and RoPE of [text; video], laid out for the sp group
        split = SequenceSplit.build(self.sp_group, txt.shape[1], vid.shape[1])
        video_pos = flux_positions(shapes).to(x.device)
        pos = split.pad_positions(video_pos.new_zeros(txt.shape[1], 3), video_pos)  # (S', 3)
        valid = split.pad_valid(
            text_mask.bool(), torch.ones(b, vid.shape[1], dtype=torch.bool, device=x.device)
        )
        mask = attention_mask(valid, pos[:, 0] if self.temporal_causal else None)  # (B, 1, S', S')
        rope, mask = split.arrange(rope_table(pos, self.axes_dims), mask)
        txt, vid = split.shard(txt, split.text_pad), split.shard(vid, split.video_pad)  # this rank's tokens
        # 4. double-stream blocks
        for block in self.transformer_blocks:
            vid, txt = block(vid, txt, temb, rope, mask)
        # 5. single-stream blocks over [text; video]
        lt = txt.shape[1]
        h = torch.cat([txt, vid], dim=1)
        for block in self.single_transformer_blocks:
            h = block(h, temb, rope, mask)
        # 6. output of the denoised clip's tokens only
        out = self.proj_out(self.norm_out(h[:, lt:], temb))  # (B, N_local, 4C)
        out = split.gather_video(out)[:, -tx * (hx // PATCH) * (wx // PATCH) :]
        return unpatchify(out, tx, hx // PATCH, wx // PATCH)
