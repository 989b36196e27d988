"""Open-Sora-Plan v1.3's text-to-video DiT (``OpenSoraT2V_v1_3``), written for one device.

Architecture (PKU-YuanGroup/Open-Sora-Plan, ``opensora/models/diffusion/opensora_v1_3/modeling_opensora.py``
and ``modules.py``; PixArt-alpha's block with 3D RoPE and Skiparse), per block, with the ``adaln_single``
modulation ``(shift, scale, gate)`` of the timestep added to the block's ``scale_shift_table``:

1. ``x += gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)`` with 3D RoPE on q/k and, in the sparse
   blocks, Skiparse (skiparse.py);
2. ``x += CrossAttn(x, text)`` (no norm, no gate: as upstream), text = the projected mT5 tokens, masked;
3. ``x += gate_mlp * FF(LN(x) * (1 + scale_mlp) + shift_mlp)`` with a gelu-tanh MLP (4x).

Parameter names equal the released checkpoint's (``pos_embed.proj``, ``caption_projection.linear_{1,2}``,
``adaln_single.{emb.timestep_embedder.linear_{1,2},linear}``, ``transformer_blocks.i.{attn1,attn2}.{to_q,to_k,
to_v,to_out.0}``, ``.ff.net.{0.proj,2}``, ``.scale_shift_table``, ``scale_shift_table``, ``proj_out``), so its
``diffusion_pytorch_model.safetensors`` loads with ``strict=True`` (released.py).

Parallelism is applied from outside (``frameloom.parallel.parallelize``): FSDP2, activation checkpointing and
compile act on ``transformer_blocks``; ``enable_sequence_parallel(group)`` splits the token sequence over a
Ulysses group (the self-attention gathers the sequence and scatters heads, so RoPE and the Skiparse
rearrangement always see the whole sequence, exactly as on one device).

Deliberate differences from upstream (docs/opensora_plan.md): no latent-grid attention mask (frameloom batches
one shape at a time, where upstream's mask is all ones); the timestep reaches the embedding in float32
(upstream's pipeline casts it to the activations' dtype, which in bfloat16 rounds 999 to 1000); RoPE angles in
float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError
from frameloom.models.opensora_plan.rope import apply_rope_3d, rope_3d_tables
from frameloom.models.opensora_plan.skiparse import (
    block_kind,
    skiparse,
    skiparse_key_bias,
    skiparse_pad,
    unskiparse,
)

__all__ = ["OpenSoraPlanConfig", "OpenSoraPlanT2V", "PRESETS", "timestep_embedding"]


@dataclass
class OpenSoraPlanConfig:
    """The ``OpenSoraT2V_v1_3`` constructor arguments (the released ``config.json``'s keys); defaults are the
    ``OpenSoraT2V_v1_3-2B/122`` preset with WF-VAE (8 channels) and mT5-XXL (4096)."""

    num_attention_heads: int = 24
    attention_head_dim: int = 96
    in_channels: int = 8
    out_channels: int | None = 8
    num_layers: int = 32
    cross_attention_dim: int | None = 2304
    caption_channels: int = 4096
    patch_size: int = 2
    patch_size_t: int = 1
    activation_fn: str = "gelu-approximate"
    attention_bias: bool = True
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale_t: float = 1.0
    interpolation_scale_h: float = 1.0
    interpolation_scale_w: float = 1.0
    sparse1d: bool = True
    sparse_n: int = 4
    # upstream constructor arguments that do not change the computation of this configuration
    sample_size_h: int | None = None
    sample_size_w: int | None = None
    sample_size_t: int | None = None
    dropout: float = 0.0
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OpenSoraPlanConfig:
        """From a ``config.json`` / ``model.config`` mapping; keys starting with ``_`` are ignored, unknown
        ones are an error naming them."""
        known = {f.name for f in fields(cls)}
        clean = {k: v for k, v in values.items() if not str(k).startswith("_")}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise FrameloomError(f"Open-Sora-Plan DiT config: unknown keys {unknown}")
        cfg = cls(**clean)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings the v1.3 model never uses (and this implementation does not compute)."""
        need = {
            "activation_fn": "gelu-approximate",
            "norm_elementwise_affine": False,
            "patch_size_t": 1,
            "only_cross_attention": False,
            "double_self_attention": False,
            "dropout": 0.0,
        }
        for key, value in need.items():
            if getattr(self, key) != value:
                raise FrameloomError(
                    f"Open-Sora-Plan DiT config: {key} must be {value!r} (v1.3), not {getattr(self, key)!r}"
                )
        if self.cross_attention_dim not in (None, self.hidden_size):
            raise FrameloomError(
                f"Open-Sora-Plan DiT config: cross_attention_dim ({self.cross_attention_dim}) must equal the hidden "
                f"size ({self.hidden_size}): the text is projected to it"
            )
        if self.attention_head_dim % 6:
            raise FrameloomError(
                f"Open-Sora-Plan DiT config: attention_head_dim must be divisible by 6 (3D RoPE), not {self.attention_head_dim}"
            )
        if self.sparse_n < 1:
            raise FrameloomError(f"Open-Sora-Plan DiT config: sparse_n must be >= 1, not {self.sparse_n}")


#: Named sizes (``model.preset``); ``model.config`` entries override them.
PRESETS: dict[str, dict[str, Any]] = {
    "2B/122": {},  # OpenSoraT2V_v1_3-2B/122: the dataclass defaults (2.7B parameters)
}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features ``[cos, sin]`` ``(B, dim)`` (DDPM/ADM; diffusers' ``Timesteps`` with
    ``flip_sin_to_cos=True``, ``downscale_freq_shift=0``): frequencies ``exp(-ln(max_period) i / (dim/2))``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# -------------------------------------------------------------------------------------------------------- parts


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    """``net.0.proj`` (D -> 4D, gelu-tanh), ``net.2`` (4D -> D): diffusers' ``FeedForward`` layout."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _Attention(nn.Module):
    """q/k/v/out projections with diffusers' ``Attention`` names; the attention itself is the caller's."""

    def __init__(self, dim: int, kv_dim: int, bias: bool):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=True)])


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class _TimestepEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = _TimestepEmbedder(dim)


class _AdaLNSingle(nn.Module):
    """PixArt-alpha's ``adaln_single``: one timestep MLP shared by every block -> ``6 D`` modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmbeddings(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb.timestep_embedder(timestep_embedding(t))  # (B, D)
        return self.linear(F.silu(embedded)), embedded  # (B, 6D), (B, D)


class _CaptionProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text), approximate="tanh"))


class _PatchEmbed(nn.Module):
    """Each frame patchified by a ``Conv2d`` (upstream ``PatchEmbed2D``)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B T, D, h', w')
        x = x.reshape(b, t, *x.shape[1:]).permute(0, 1, 3, 4, 2)  # (B, T, h', w', D)
        return x.reshape(b, -1, x.shape[-1])  # (B, T h' w', D)


# -------------------------------------------------------------------------------------------------------- block


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H d)`` -> ``(B, H, N, d)``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class OpenSoraPlanBlock(nn.Module):
    """One v1.3 block (module docstring). ``kind`` is its Skiparse kind (None, "single", "group")."""

    def __init__(self, cfg: OpenSoraPlanConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kind = block_kind(index, cfg.sparse1d)
        self.sparse_n = cfg.sparse_n
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn1 = _Attention(dim, dim, cfg.attention_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn2 = _Attention(dim, cfg.cross_attention_dim or dim, cfg.attention_bias)
        self.ff = _FeedForward(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.sp_group = None  # a Ulysses group (enable_sequence_parallel)

    def self_attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``(B, N_local, D)`` -> ``(B, N_local, D)``; RoPE and Skiparse on the whole sequence."""
        q, k, v = (
            _heads(proj(x), self.heads) for proj in (self.attn1.to_q, self.attn1.to_k, self.attn1.to_v)
        )
        if self.sp_group is not None:  # 1. heads scattered, sequence gathered: (B, H/sp, N, d)
            from frameloom.parallel.sequence import all_to_all

            q, k, v = (all_to_all(z, self.sp_group, scatter_dim=1, gather_dim=2) for z in (q, k, v))
        # 2. rotary positions of the whole (t, h, w) grid
        q, k = apply_rope_3d(q, *rope), apply_rope_3d(k, *rope)
        # 3. Skiparse: pad to n^2, move the token groups into the batch, attend, move back
        n_tokens, bias = q.shape[2], None
        if self.kind is not None and self.sparse_n > 1:
            pad = skiparse_pad(n_tokens, self.sparse_n)
            q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))  # (B, H, N_pad, d)
            q, k, v = (skiparse(z, self.sparse_n, self.kind) for z in (q, k, v))  # (n B, H, N_pad / n, d)
            bias = skiparse_key_bias(n_tokens, self.sparse_n, self.kind, x.shape[0], q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.kind is not None and self.sparse_n > 1:
            out = unskiparse(out, self.sparse_n, self.kind)[:, :, :n_tokens]  # (B, H, N, d)
        if self.sp_group is not None:  # 4. back to this rank's tokens, all heads: (B, H, N_local, d)
            from frameloom.parallel.sequence import all_to_all

            out = all_to_all(out, self.sp_group, scatter_dim=2, gather_dim=1)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, N_local, D)
        return self.attn1.to_out[0](out)

    def cross_attention(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Video tokens ``(B, N, D)`` attend to the projected text ``(B, L, D)`` (mask ``(B, 1, 1, L)``)."""
        q = _heads(self.attn2.to_q(x), self.heads)
        k, v = _heads(self.attn2.to_k(text), self.heads), _heads(self.attn2.to_v(text), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask)  # (B, H, N, d)
        return self.attn2.to_out[0](out.transpose(1, 2).reshape(x.shape))

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        # temb (B, 6D) + table (6, D) -> six (B, 1, D) modulations
        mod = self.scale_shift_table[None] + temb.reshape(temb.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unsqueeze(2).unbind(1)
        # 1. self-attention
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attention(h, rope)
        # 2. cross-attention (no norm, no gate)
        x = x + self.cross_attention(x, text, text_mask)
        # 3. feed-forward
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


# -------------------------------------------------------------------------------------------------------- model


class OpenSoraPlanT2V(nn.Module):
    """``forward(x (B, C, T, H, W), t (B,), text (B, L, caption_channels), text_mask (B, L)) -> (B, C, T, H, W)``:
    the model's prediction (v or epsilon, as trained) for latents ``x`` at integer or float timesteps ``t``."""

    def __init__(self, cfg: OpenSoraPlanConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg if cfg is not None else OpenSoraPlanConfig.from_dict(kwargs)
        cfg.check()
        self.config = cfg
        dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)  # the trainer's sequence-split check
        self.caption_projection = _CaptionProjection(cfg.caption_channels, dim)
        self.pos_embed = _PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.transformer_blocks = nn.ModuleList([OpenSoraPlanBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, cfg.patch_size_t * cfg.patch_size**2 * cfg.output_channels)
        self.adaln_single = _AdaLNSingle(dim)
        self.sp_group = None

    def enable_sequence_parallel(self, group) -> None:
        """Ulysses over ``group`` (``frameloom.parallel.parallelize`` calls it for ``parallel.sp_size > 1``):
        every rank of the group gets the same batch, keeps ``1/sp`` of the video tokens through the blocks
        and gathers them after ``proj_out``. Heads and tokens must divide by the group size."""
        import torch.distributed as dist

        sp = dist.get_world_size(group)
        if self.num_heads % sp:
            raise FrameloomError(f"parallel.sp_size={sp} must divide the {self.num_heads} attention heads")
        self.sp_group = group
        for block in self.transformer_blocks:
            block.sp_group = group

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        b, _, frames, height, width = x.shape
        p = self.config.patch_size
        grid = (frames, height // p, width // p)
        # 1. patches, timestep modulation, projected text
        h = self.pos_embed(x)  # (B, N, D)
        temb, embedded = self.adaln_single(t.to(x.device))  # (B, 6D), (B, D)
        txt = self.caption_projection(text)  # (B, L, D)
        txt_mask = text_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        rope = rope_3d_tables(
            grid,
            self.config.attention_head_dim,
            (
                self.config.interpolation_scale_t,
                self.config.interpolation_scale_h,
                self.config.interpolation_scale_w,
            ),
            device=x.device,
        )  # 2 x (N, 3, head_dim / 3)
        # 2. sequence parallel: this rank's share of the tokens
        if self.sp_group is not None:
            from frameloom.parallel.sequence import shard_sequence

            h = shard_sequence(h, self.sp_group, dim=1)  # (B, N / sp, D)
        # 3. blocks
        for block in self.transformer_blocks:
            h = block(h, temb, txt, txt_mask, rope)
        # 4. final modulation and projection
        shift, scale = (self.scale_shift_table[None] + embedded[:, None]).unbind(1)  # 2 x (B, D)
        h = self.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = self.proj_out(h)  # (B, N_local, p p C)
        if self.sp_group is not None:
            from frameloom.parallel.sequence import gather_sequence

            h = gather_sequence(h, self.sp_group, dim=1)  # (B, N, p p C)
        # 5. unpatchify: channels ordered (p_t, p_h, p_w, C) as upstream's einsum "nthwopqc->nctohpwq"
        c = self.config.output_channels
        h = h.reshape(b, grid[0], grid[1], grid[2], 1, p, p, c)
        h = torch.einsum("nthwopqc->nctohpwq", h)
        return h.reshape(b, c, frames, grid[1] * p, grid[2] * p)
