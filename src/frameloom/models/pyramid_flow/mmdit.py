"""Pyramid Flow's SD3 transformer (``PyramidDiffusionMMDiT``, jy0205/Pyramid-Flow
``pyramid_dit/mmdit_modules``): SD3-medium's MMDiT (joint blocks, the last one text-pre-only), a 2x2 patch
convolution with SD3's cropped 2-D sincos table (coarser history clips get the table interpolated onto their
grid) and RoPE over the frame index only. Conditioning: timestep + pooled CLIP-L and CLIP-G (2048). Parameter
names are the released ``pyramid-flow-sd3`` checkpoints' (SEED_MODELS.md), including the persistent
``pos_embed.pos_embed`` table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError

from .flux import unpatchify
from .layers import (
    AdaNormContinuous,
    AdaNormZero,
    FeedForward,
    RMSNorm,
    SequenceSplit,
    TimeTextEmbedding,
    attend,
    attention_mask,
    enable_ulysses,
    rope_table,
)

__all__ = ["PyramidMMDiT", "sd3_sincos_table"]


def sd3_sincos_table(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """SD3's 2-D sincos position table ``(grid*grid, dim)``: positions ``i / (grid / base_size)`` per axis,
    half the channels for rows and half for columns, each ``[sin, cos]`` of ``pos * 10000^(-j / (d/4))``
    (diffusers ``get_2d_sincos_pos_embed`` with interpolation_scale 1)."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32) / (grid / base_size)
    cw, ch = np.meshgrid(coords, coords)  # w first, as upstream
    emb = np.concatenate([one_axis(dim // 2, cw), one_axis(dim // 2, ch)], axis=1)
    return torch.from_numpy(emb).float()


class _PatchEmbed(nn.Module):
    """``pos_embed``: 2x2 patch convolution per frame plus the cropped sincos table."""

    def __init__(self, in_channels: int, dim: int, patch: int, max_size: int, sample_size: int, interp: bool):
        super().__init__()
        self.patch, self.max_size, self.interp = patch, max_size, interp
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer(
            "pos_embed", sd3_sincos_table(dim, max_size, sample_size // patch)[None], persistent=True
        )

    def spatial(self, h: int, w: int, full_h: int, full_w: int) -> torch.Tensor:
        """Table rows for an ``h x w`` token grid whose clip is denoised at ``full_h x full_w`` tokens:
        the centred ``full`` crop, bilinearly resized to ``h x w`` (interp_condition_pos), ``(h*w, D)``."""
        ch, cw = (full_h, full_w) if self.interp else (h, w)
        if ch > self.max_size or cw > self.max_size:
            raise FrameloomError(f"{ch}x{cw} tokens exceed the model's pos_embed_max_size {self.max_size}")
        top, left = (self.max_size - ch) // 2, (self.max_size - cw) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[
            :, top : top + ch, left : left + cw
        ]
        if (ch, cw) != (h, w):
            table = F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
        return table.reshape(h * w, -1)

    def forward(self, clip: torch.Tensor, full_h: int, full_w: int) -> torch.Tensor:
        b, c, t, h, w = clip.shape
        x = self.proj(clip.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T, D, h/p, w/p)
        x = x.flatten(2).transpose(1, 2)  # (B*T, n, D)
        x = (x + self.spatial(h // self.patch, w // self.patch, full_h, full_w).to(x.dtype)).to(x.dtype)
        return x.reshape(b, t * x.shape[1], -1)  # (B, T*n, D)


class _JointAttention(nn.Module):
    """SD3 joint attention (``add_*_proj`` for text, RMS qk-norm eps 1e-5, ``norm_add_q/k`` for text); the
    last block's text stream is not projected out (``context_pre_only``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_k_proj, self.add_v_proj, self.add_q_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_add_q, self.norm_add_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)
        self.sp_group: dist.ProcessGroup | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, vid, txt, rope, mask):
        lt = txt.shape[1]
        q = torch.cat(
            [self.norm_add_q(self._heads(self.add_q_proj(txt))), self.norm_q(self._heads(self.to_q(vid)))], 1
        )
        k = torch.cat(
            [self.norm_add_k(self._heads(self.add_k_proj(txt))), self.norm_k(self._heads(self.to_k(vid)))], 1
        )
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(vid))], 1)  # (B, S, h, hd)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rope, mask, self.sp_group)
        out = out.transpose(1, 2).flatten(2)  # (B, S, D)
        text_out = None if self.context_pre_only else self.to_add_out(out[:, :lt])
        return self.to_out[0](out[:, lt:]), text_out


class JointBlock(nn.Module):
    """``transformer_blocks.i`` (SD3 ``JointTransformerBlock``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaNormZero(dim)
        self.norm1_context = AdaNormContinuous(dim) if context_pre_only else AdaNormZero(dim)
        self.attn = _JointAttention(dim, heads, head_dim, context_pre_only)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def forward(self, vid, txt, temb, rope, mask):
        # 1. modulation of both streams
        nv, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(vid, temb)
        if self.context_pre_only:
            nt = self.norm1_context(txt, temb)
        else:
            nt, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(txt, temb)
        # 2. joint attention
        attn_v, attn_t = self.attn(nv, nt, rope, mask)
        vid = vid + gate * attn_v
        vid = vid + gate_mlp * self.ff(
            F.layer_norm(vid, (vid.shape[-1],), eps=1e-6) * (1 + scale_mlp) + shift_mlp
        )
        # 3. the text stream (not after the last block)
        if self.context_pre_only:
            return vid, txt
        txt = txt + c_gate * attn_t
        nt = F.layer_norm(txt, (txt.shape[-1],), eps=1e-6) * (1 + c_scale_mlp) + c_shift_mlp
        return vid, txt + c_gate_mlp * self.ff_context(nt)


class PyramidMMDiT(nn.Module):
    """The SD3 DiT; same call as ``PyramidFluxTransformer``: ``forward(x, t, text, text_mask, pooled,
    history=None) -> (B, C, T, H, W)`` (``pooled`` is CLIP-L and CLIP-G concatenated, 2048)."""

    variant = "sd3"

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        joint_attention_dim: int = 4096,
        interp_condition_pos: bool = True,
        temporal_causal: bool = True,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if caption_projection_dim != dim:
            raise FrameloomError(
                f"model.config: caption_projection_dim {caption_projection_dim} must equal the hidden size {dim}"
            )
        self.config = {
            "sample_size": sample_size,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "num_layers": num_layers,
            "attention_head_dim": attention_head_dim,
            "num_attention_heads": num_attention_heads,
            "caption_projection_dim": caption_projection_dim,
            "pooled_projection_dim": pooled_projection_dim,
            "pos_embed_max_size": pos_embed_max_size,
            "joint_attention_dim": joint_attention_dim,
            "interp_condition_pos": interp_condition_pos,
            "temporal_causal": temporal_causal,
        }
        self.num_heads, self.head_dim, self.patch = num_attention_heads, attention_head_dim, patch_size
        self.latent_channels = in_channels
        self.temporal_causal = temporal_causal
        self.pos_embed = _PatchEmbed(
            in_channels, dim, patch_size, pos_embed_max_size, sample_size, interp_condition_pos
        )
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(dim, num_attention_heads, attention_head_dim, context_pre_only=i == num_layers - 1)
            for i in range(num_layers)
        )
        self.norm_out = AdaNormContinuous(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.sp_group: dist.ProcessGroup | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier linears and patch conv, N(0, 0.02) conditioning, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for lin in (
            *self.time_text_embed.timestep_embedder.children(),
            *self.time_text_embed.text_embedder.children(),
        ):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.context_embedder.weight, std=0.02)
        for lin in [self.norm_out.linear, self.proj_out] + [
            m for b in self.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)
        ]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def enable_sequence_parallel(self, group: dist.ProcessGroup) -> None:
        """Ulysses over ``group`` (frameloom.parallel.parallelize calls this when parallel.sp_size > 1)."""
        enable_ulysses(self, group, self.transformer_blocks)

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
        p = self.patch
        # 1. conditioning
        temb = self.time_text_embed(t, pooled)  # (B, D)
        txt = self.context_embedder(text)  # (B, L, D)
        # 2. video tokens with their spatial table; frame index of every token (history first, from 0)
        vid = torch.cat([self.pos_embed(c, hx // p, wx // p) for c in clips], dim=1)  # (B, N, D)
        frames, start = [], 0
        for c in clips:  # every token of frame f of a clip starting at frame s sits at s + f
            frames.append(
                torch.arange(start, start + c.shape[2]).repeat_interleave(
                    (c.shape[3] // p) * (c.shape[4] // p)
                )
            )
            start += c.shape[2]
        video_pos = torch.cat(frames).float()[:, None].to(x.device)  # (N, 1)
        # 3. positions (text at frame 0), mask and temporal RoPE, laid out for the sp group
        split = SequenceSplit.build(self.sp_group, txt.shape[1], vid.shape[1])
        pos = split.pad_positions(video_pos.new_zeros(txt.shape[1], 1), video_pos)  # (S', 1)
        valid = split.pad_valid(
            text_mask.bool(), torch.ones(b, vid.shape[1], dtype=torch.bool, device=x.device)
        )
        mask = attention_mask(valid, pos[:, 0] if self.temporal_causal else None)
        rope, mask = split.arrange(rope_table(pos, (self.head_dim,)), mask)
        txt, vid = split.shard(txt, split.text_pad), split.shard(vid, split.video_pad)
        # 4. joint blocks
        for block in self.transformer_blocks:
            vid, txt = block(vid, txt, temb, rope, mask)
        # 5. output of the denoised clip's tokens
        out = self.proj_out(self.norm_out(vid, temb))  # (B, N_local, p*p*C)
        out = split.gather_video(out)[:, -tx * (hx // p) * (wx // p) :]
        return unpatchify(out, tx, hx // p, wx // p, p)
