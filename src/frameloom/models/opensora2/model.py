"""Open-Sora 2.0's MMDiT: Flux-style double-stream then single-stream blocks over video and T5 tokens.

Read from hpcaitech/Open-Sora (``opensora/models/mmdit/model.py``, ``layers.py``, ``math.py``; SEED_MODELS.md):

- inputs: the latent video patchified ``b c t (h p) (w p) -> b (t h w) (c p p)`` (patch 2 for the 16-channel
  HunyuanVideo VAE, 1 for the 128-channel video DC-AE) through ``img_in``; the optional image condition
  ``cond`` (a 0/1 mask channel + the masked reference latent, patchified the same way: ``(1 + C) p^2``
  features) through the zero-initialised ``cond_in`` and added to it; T5 tokens through ``txt_in``;
- ``vec = time_in(sinusoid(1000 t)) [+ guidance_in(sinusoid(1000 g))] + vector_in(CLIP pooled)``: one vector
  per sample that modulates every block (shift, scale, gate; adaLN);
- double blocks: text and video keep their own weights (modulation, qkv, qk RMSNorm, projection, MLP) and
  attend jointly over ``[text; video]``; single blocks: one stream over ``[text; video]`` with a parallel
  attention + MLP projection (``v_mlp`` / ``linear2``);
- RoPE on the joint sequence with 3 axes (t, h, w) (text tokens at 0: no rotation), in the rotate-half
  layout (``rope: rotate_half``) or Flux's interleaved one (``rope: interleaved``), see rope.py;
- no attention mask: Open-Sora feeds T5 padded to 512 tokens and attends to all of them (``text_mask:
  false``); ``text_mask: true`` masks the padded text keys for encoders whose padding is not meaningful.

Parameter names are the released ``Open_Sora_v2.safetensors`` keys (with ``fused_qkv`` the Flux names:
``img_attn.qkv``, ``linear1``). Written for one device; sequence parallelism is switched on from outside
(``enable_sequence_parallel``), checkpointing/FSDP act on ``double_blocks``/``single_blocks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope, rope_angles, rope_tables, video_positions

__all__ = [
    "MMDiTConfig",
    "OpenSoraMMDiT",
    "attend",
    "count_parameters",
    "joint_attention",
    "pack",
    "parse_config",
    "timestep_embedding",
    "unpack",
]


@dataclass
class MMDiTConfig:
    """The constructor arguments (Open-Sora's ``MMDiTConfig`` names; the defaults are the released 11B model)."""

    in_channels: int = 64
    """Patchified latent features: latent channels x patch_size^2 (16 x 4 HunyuanVideo, 128 x 1 DC-AE)."""
    vec_in_dim: int = 768
    """Pooled text vector width (CLIP-L)."""
    context_in_dim: int = 4096
    """Text token width (T5-XXL)."""
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    """Double-stream blocks."""
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    """RoPE channels per axis (t, h, w); sums to hidden_size / num_heads."""
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False
    """Flux-dev's guidance embedder (``guidance_in``); Open-Sora 2.0 has none."""
    cond_embed: bool = False
    """Image conditioning input ``cond_in`` (the released model has it)."""
    fused_qkv: bool = False
    """One ``qkv`` / ``linear1`` projection (Flux's layout) instead of ``q_proj, k_proj, v_proj`` / ``v_mlp``."""
    rope: str = "rotate_half"
    """``rotate_half`` (Open-Sora 2.0, ``use_liger_rope``) or ``interleaved`` (Flux)."""
    patch_size: int = 2
    text_mask: bool = False
    """Mask padded text keys (False: attend to every text position, as Open-Sora's fixed-length T5 input)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must sum to the head dim {self.hidden_size // self.num_heads}"
            )
        if self.rope not in ("rotate_half", "interleaved"):
            raise ValueError(f"rope must be rotate_half or interleaved, got {self.rope!r}")
        if self.in_channels % (self.patch_size**2):
            raise ValueError(f"in_channels {self.in_channels} must be a multiple of patch_size^2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# pure functions


def timestep_embedding(t: torch.Tensor, dim: int = 256, time_factor: float = 1000.0) -> torch.Tensor:
    """Flux/Open-Sora sinusoid of ``time_factor * t``: ``[cos(a), sin(a)]``, ``a = 1000 t * 10000^(-i/half)``,
    ``(B,) -> (B, dim)`` float32 (``layers.timestep_embedding``; the model receives t in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, T, H, W) -> (B, T*(H/p)*(W/p), C*p*p)``, i.e. ``b c t (h p) (w q) -> b (t h w) (c p q)``."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * (H // patch) * (W // patch), C * patch * patch)


def unpack(x: torch.Tensor, grid: tuple[int, int, int], patch: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(B, t*h*w, C*p*p) -> (B, C, t, h*p, w*p)`` for ``grid = (t, h, w)``."""
    B = x.shape[0]
    t, h, w = grid
    x = x.reshape(B, t, h, w, -1, patch, patch)  # (B, t, h, w, C, p, p)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, -1, t, h * patch, w * patch)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_mask: torch.Tensor | None,
    layout: str,
) -> torch.Tensor:
    """RoPE on q, k ``(B, heads, S, hd)`` then softmax attention (scale ``hd^-0.5``) over the whole joint
    sequence; ``key_mask`` ``(B, S)`` bool or None; -> ``(B, heads, S, hd)`` (``math.attention``)."""
    q, k = apply_rope(q, cos, sin, layout), apply_rope(k, cos, sin, layout)
    mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_mask: torch.Tensor | None,
    layout: str,
) -> torch.Tensor:
    """:func:`attend` with the heads merged: ``-> (B, S, heads * hd)``."""
    return attend(q, k, v, cos, sin, key_mask, layout).transpose(1, 2).flatten(2)


#: The attention kernel a block calls: ``(q, k, v, cos, sin, key_mask, text_len) -> (B, S, heads*hd)``, where
#: ``text_len`` is how many of the S tokens (the first ones) are text. Replaced by a sequence-parallel one
#: from outside (``OpenSoraMMDiT.enable_sequence_parallel``).
AttentionFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# layers


class MLPEmbedder(nn.Module):
    """``out_layer(silu(in_layer(x)))`` (``time_in``, ``vector_in``, ``guidance_in``)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the head dim, eps 1e-6, computed in float32, cast back, then times ``scale``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class Modulation(nn.Module):
    """``lin(silu(vec))`` split into (shift, scale, gate) once (single) or twice (double), each ``(B, 1, D)``."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class StreamAttention(nn.Module):
    """One stream's projections of a double block: q/k/v (or fused qkv), qk-norm, output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.fused = num_heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, S, D) -> 3 x (B, heads, S, hd)``, q and k RMS-normed (cast to v's dtype)."""
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for y in (q, k, v))
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


class DoubleStreamBlock(nn.Module):
    """Text and video with their own weights, joint attention over ``[text; video]``."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, fused: bool) -> None:
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", StreamAttention(hidden, num_heads, qkv_bias, fused))
            setattr(self, f"{s}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{s}_mlp",
                nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden)),
            )
        self.attention_fn: AttentionFn = _local_attention
        self.layout = "rotate_half"

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. modulation: (shift, scale, gate) x 2 per stream, each (B, 1, D)
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod(vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod(vec)
        # 2. per-stream q, k, v: (B, heads, N, hd) and (B, heads, L, hd)
        iq, ik, iv = self.img_attn.qkv_heads(_modulate(self.img_norm1(img), i_sh1, i_sc1))
        tq, tk, tv = self.txt_attn.qkv_heads(_modulate(self.txt_norm1(txt), t_sh1, t_sc1))
        # 3. joint attention over [text; video]: (B, L + N, D)
        L = txt.shape[1]
        attn = self.attention_fn(
            torch.cat([tq, iq], dim=2),
            torch.cat([tk, ik], dim=2),
            torch.cat([tv, iv], dim=2),
            cos,
            sin,
            key_mask,
            L,
            self.layout,
        )
        txt_attn, img_attn = attn[:, :L], attn[:, L:]
        # 4. gated residuals: attention, then MLP
        img = img + i_g1 * self.img_attn.proj(img_attn)
        img = img + i_g2 * self.img_mlp(_modulate(self.img_norm2(img), i_sh2, i_sc2))
        txt = txt + t_g1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_g2 * self.txt_mlp(_modulate(self.txt_norm2(txt), t_sh2, t_sc2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over ``[text; video]``: parallel attention and MLP (ViT-22B style) with one modulation."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, fused: bool) -> None:
        super().__init__()
        self.hidden, self.num_heads, self.fused = hidden, num_heads, fused
        self.mlp_hidden = int(hidden * mlp_ratio)
        if fused:
            self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        else:
            self.q_proj = nn.Linear(hidden, hidden)
            self.k_proj = nn.Linear(hidden, hidden)
            self.v_mlp = nn.Linear(hidden, hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden, double=False)
        self.attention_fn: AttentionFn = _local_attention
        self.layout = "rotate_half"

    def forward(
        self,
        x: torch.Tensor,
        vec: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        text_len: int = 0,
    ) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)  # each (B, 1, D)
        h = _modulate(self.pre_norm(x), shift, scale)  # (B, S, D)
        # 1. projections: q, k (B, S, D), v (B, S, D), MLP input (B, S, mlp)
        if self.fused:
            q, k, v, mlp = self.linear1(h).split([self.hidden] * 3 + [self.mlp_hidden], dim=-1)
        else:
            q, k = self.q_proj(h), self.k_proj(h)
            v, mlp = self.v_mlp(h).split([self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = (
            y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for y in (q, k, v)
        )  # (B, heads, S, hd)
        q, k = self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype)
        # 2. attention and MLP in parallel, one output projection, gated residual
        attn = self.attention_fn(q, k, v, cos, sin, key_mask, text_len, self.layout)  # (B, S, D)
        out = self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # shift first (Flux)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


def _local_attention(q, k, v, cos, sin, key_mask, text_len, layout):  # noqa: ARG001 (text_len: SP only)
    return joint_attention(q, k, v, cos, sin, key_mask, layout)


# --------------------------------------------------------------------------------------------------------
# the model


class OpenSoraMMDiT(nn.Module):
    """The MMDiT in frameloom's denoiser layout:
    ``forward(x (B, C, T, H, W), t (B,), text (B, L, context_in_dim), text_mask (B, L), pooled (B, vec_in_dim),
    cond (B, 1 + C, T, H, W) | None) -> velocity (B, C, T, H, W)``."""

    def __init__(self, config: MMDiTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if config is not None else MMDiTConfig(**kwargs)
        c = self.config
        self.patch_size = c.patch_size
        self.latent_channels = c.in_channels // c.patch_size**2
        self.num_heads = c.num_heads
        self.hidden_size = c.hidden_size
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        if c.cond_embed:
            self.cond_in = nn.Linear(c.in_channels + c.patch_size**2, c.hidden_size)
            nn.init.zeros_(self.cond_in.weight)  # a new input starts as "no condition" (upstream does too)
            nn.init.zeros_(self.cond_in.bias)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        args = (c.hidden_size, c.num_heads, c.mlp_ratio)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(*args, c.qkv_bias, c.fused_qkv) for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(*args, c.fused_qkv) for _ in range(c.depth_single_blocks)
        )
        for block in (*self.double_blocks, *self.single_blocks):
            block.layout = c.rope
        self.final_layer = LastLayer(c.hidden_size, c.in_channels)
        self.sp_group = None  # set by enable_sequence_parallel

    # ---------------------------------------------------------------- frameloom hooks

    def enable_sequence_parallel(self, group) -> None:
        """Ulysses over ``group`` (``frameloom.parallel.parallelize`` calls this when ``parallel.sp_size > 1``):
        each rank keeps 1/sp of the text and video tokens; attention gathers the sequence per head group."""
        import torch.distributed as dist

        from frameloom.errors import FrameloomError

        from .sequence import ulysses_joint_attention

        sp = dist.get_world_size(group)
        if self.num_heads % sp:
            raise FrameloomError(
                f"parallel.sp_size {sp} must divide the MMDiT's {self.num_heads} attention heads"
            )
        attention = ulysses_joint_attention(group)
        for block in (*self.double_blocks, *self.single_blocks):
            block.attention_fn = attention
        self.sp_group = group

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        if pooled is None:
            raise ValueError("OpenSoraMMDiT needs pooled= (the CLIP pooled text vector, (B, vec_in_dim))")
        B, _, T, H, W = x.shape
        p = self.patch_size
        grid = (T, H // p, W // p)
        # 1. video tokens (+ image condition): (B, N, D); text tokens: (B, L, D)
        img = self.img_in(pack(x, p))
        if c.cond_embed:
            if cond is None:  # text-to-video: mask 0, no reference (what Open-Sora feeds for t2v)
                cond = x.new_zeros(B, 1 + self.latent_channels, T, H, W)
            img = img + self.cond_in(pack(cond.to(x.dtype), p))
        txt = self.txt_in(text.to(x.dtype))
        L = txt.shape[1]
        # 2. the modulation vector: (B, D)
        vec = self.time_in(timestep_embedding(t).to(img.dtype))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("a guidance-distilled model (guidance_embed) needs guidance=")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(pooled.to(x.dtype))
        # 3. RoPE tables for the whole joint sequence [text; video]: (L + N, hd/2) each
        cos, sin = rope_tables(
            rope_angles(video_positions(*grid, text_len=L, device=x.device), c.axes_dim, c.theta)
        )
        key_mask = None
        if c.text_mask and text_mask is not None:  # (B, L + N): text padding masked, every video token kept
            key_mask = torch.cat([text_mask.bool(), text_mask.new_ones(B, img.shape[1], dtype=torch.bool)], 1)
        if self.sp_group is not None:  # this rank's 1/sp of each stream's tokens
            from frameloom.parallel.sequence import shard_sequence

            img, txt = shard_sequence(img, self.sp_group), shard_sequence(txt, self.sp_group)
        # 4. double-stream blocks, then single-stream blocks over [text; video]
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin, key_mask)
        h = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            h = block(h, vec, cos, sin, key_mask, txt.shape[1])
        # 5. video tokens out: (B, N, C p p) -> (B, C, T, H, W)
        out = self.final_layer(h[:, txt.shape[1] :], vec)
        if self.sp_group is not None:
            from frameloom.parallel.sequence import gather_sequence

            out = gather_sequence(out, self.sp_group, dim=1)
        return unpack(out, grid, p)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_parameters(config: MMDiTConfig) -> int:
    """Parameters of a config without building it (the 11B preset is too large to instantiate in a test)."""
    c = config
    D, M, hd = c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.hidden_size // c.num_heads

    def lin(i: int, o: int, bias: bool = True) -> int:
        return i * o + (o if bias else 0)

    top = lin(c.in_channels, D) + lin(c.context_in_dim, D)  # img_in, txt_in
    top += lin(256, D) + lin(D, D) + lin(c.vec_in_dim, D) + lin(D, D)  # time_in, vector_in
    top += (lin(256, D) + lin(D, D)) if c.guidance_embed else 0
    top += lin(c.in_channels + c.patch_size**2, D) if c.cond_embed else 0
    stream = lin(D, 6 * D) + 3 * lin(D, D, c.qkv_bias) + 2 * hd + lin(D, D) + lin(D, M) + lin(M, D)
    single = lin(D, 3 * D) + 2 * lin(D, D) + lin(D, D + M) + lin(D + M, D) + 2 * hd
    final = lin(D, c.in_channels) + lin(D, 2 * D)
    return top + c.depth * 2 * stream + c.depth_single_blocks * single + final


def parse_config(values: dict[str, Any]) -> MMDiTConfig:
    """``MMDiTConfig`` from a mapping (lists for axes_dim); unknown keys raise ``TypeError``."""
    return MMDiTConfig(**{k: (list(v) if k == "axes_dim" else v) for k, v in values.items()})
