"""frameloom's own text-to-video diffusion transformer (DiT with 3D RoPE, cross-attention and adaLN-Zero).

The architecture follows DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023) for the
adaLN-Zero conditioning on the timestep, PixArt-alpha for the per-block cross-attention to text tokens, and
the video DiTs of Open-Sora / CogVideoX / Wan for 3D patches with 3D rotary positions. Written for a single
device: parallelism, activation checkpointing and compilation are applied from outside
(``frameloom.parallel``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from frameloom.models.text import pool_text

from .rope import apply_rope, grid_positions, rope_axes_dims, rope_freqs, sincos_embedding

__all__ = ["VideoDiT"]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale ``(B, 1, D)`` (per sample) or ``(B, N, D)``."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (already scaled) timesteps ``(B,)`` -> ``(B, dim)`` float32 (DiT / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional RMS qk-norm and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # The attention kernel, (q, k, v (B, h, N, hd), attn_mask=...) -> (B, h, N, hd). A plain attribute so that
        # frameloom.parallel can route it through sequence parallelism from outside; this file stays 1-device.
        self.attention_fn = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, hd)
        q, k, v = qkv.unbind(2)  # 3 x (B, N, h, hd)
        # qk-norm and RoPE in float32 (also under autocast), back to the activation dtype for attention
        q = apply_rope(self.q_norm(q.float()), rope).to(v.dtype)
        k = apply_rope(self.k_norm(k.float()), rope).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 x (B, h, N, hd)
        out = self.attention_fn(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(out)


class _CrossAttention(nn.Module):
    """Multi-head cross-attention from video tokens (queries) to text tokens (keys/values), no RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_keep: torch.Tensor | None,
    ) -> torch.Tensor:
        B, N, D = x.shape
        L = text.shape[1]
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)
        kv = self.kv(text).view(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, h, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, L, hd)
        q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if text_keep is not None:
            # rows without any real text token attend to zero values, so their output is 0 (L is small: cheap)
            v = v * text_keep.to(v.dtype)  # (B, h, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask)  # (B, h, N, hd)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(out)


class _Block(nn.Module):
    """DiT block: adaLN-Zero modulated self-attention (3D RoPE), cross-attention to text, and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = _SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.cross_attn = _CrossAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # shift/scale/gate for self-attention, cross-attention and MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor,
        rope: torch.Tensor,
        attn_mask: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        text_keep: torch.Tensor | None,
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(9, dim=-1)  # 9 x (B, 1 or N, D)
        sh_sa, sc_sa, g_sa, sh_ca, sc_ca, g_ca, sh_mlp, sc_mlp, g_mlp = mod
        # x + gate * f(modulate(norm(x))), the gate as one fused addcmul
        attn = self.attn(_modulate(self.norm1(x), sh_sa, sc_sa), rope, attn_mask)
        x = torch.addcmul(x, g_sa, attn)
        cross = self.cross_attn(_modulate(self.norm2(x), sh_ca, sc_ca), text, text_mask, text_keep)
        x = torch.addcmul(x, g_ca, cross)
        x = torch.addcmul(x, g_mlp, self.mlp(_modulate(self.norm3(x), sh_mlp, sc_mlp)))
        return x  # (B, N, D)


class _FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear projection of every token to its ``pt*ph*pw*C_out`` patch values."""

    def __init__(self, dim: int, patch_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, 1 or N, D)
        return self.linear(_modulate(self.norm(x), shift, scale))  # (B, N, patch_dim)


class VideoDiT(ModelMixin, ConfigMixin):
    """Text-conditioned video diffusion transformer.

    Input latents ``(B, C, T, H, W)`` are cut into non-overlapping ``(pt, ph, pw)`` patches (a linear map of
    each flattened ``(C, pt, ph, pw)`` patch, equivalent to a Conv3d with stride = kernel), processed by
    ``depth`` blocks of [self-attention with 3D RoPE, cross-attention to the text tokens, MLP], each modulated
    by the timestep through adaLN-Zero, and projected back to ``(B, C_out, T, H, W)``. Any ``(T, H, W)``
    divisible by the patch size works, and each call may use a different grid.

    Initialisation is adaLN-Zero (DiT): every modulation layer and the final projection start at zero, so each
    block starts as the identity and the model's first output is exactly zero.

    Args:
        in_channels: latent channels ``C``.
        out_channels: predicted channels (default ``in_channels``).
        patch_size: ``(pt, ph, pw)`` (an int means ``(1, p, p)``).
        hidden_size: token width ``D``.
        depth: number of blocks.
        num_heads: attention heads (``D / num_heads`` must be an even number >= 6, for 3D RoPE).
        mlp_ratio: MLP hidden width over ``D``.
        text_dim: width of the text-encoder embeddings (projected to ``D`` once per forward).
        rope_theta: RoPE base.
        qk_norm: RMSNorm on queries and keys per head (stabilises training at scale).
        norm_eps: epsilon of the LayerNorms/RMSNorms.
        frequency_embedding_size: width of the sinusoidal timestep features.
        timestep_scale: the flow time ``t in [0, 1]`` is multiplied by this before the sinusoidal embedding.
        pooled_text: also add a global text vector to the adaLN conditioning (beside cross-attention, as SD3
            and Flux add a pooled text embedding): the masked mean of the text-encoder tokens, standardized
            per channel by the buffers ``text_mean``/``text_std`` (set once per run from the training captions
            by :meth:`set_text_statistics`, like a VAE's latent scaling factor), then an MLP. Captions of one
            dataset share most of their words, so their raw means differ by little; standardizing makes the
            differences (a prompt's color, its direction) unit-sized, which gradient descent picks up many
            times faster.
        absolute_pos_embed: add a fixed 3D sine-cosine embedding of each patch's grid position to the patch
            embeddings (as CogVideoX-2B does), besides RoPE. With RoPE only, a token at high noise cannot tell
            which frame it is in, so motion that depends on the frame index (a prompt's direction) is slow to
            learn; the quickstart turns this on.
        velocity_skip: output ``t * x + F(x)`` instead of ``F(x)`` (needs ``out_channels == in_channels``).
            Near pure noise the flow velocity ``noise - x0`` is mostly the input itself (``x_t - E[x0]``);
            the skip carries that part, so the network learns only the data-dependent residual, as EDM's
            ``c_skip`` preconditioning does (Karras et al., 2022). It makes the high-noise regime, where a
            video's layout and motion are decided, far quicker to learn.
        positional_conditioning: add an MLP of each token's 3D sincos position (and, with ``pooled_text``,
            the standardized pooled text) to the adaLN conditioning vector, so shift/scale/gate are per token
            rather than per sample. This is a noise-free (prompt x frame x place) pathway: near pure noise the
            best prediction is the prompt's mean video, which depends on exactly that, and tokens whose
            features are mostly noise learn it slowly through attention alone. Costs one extra adaLN
            projection per token.
        pos_cond_theta: base of the sincos frequencies of ``positional_conditioning``. Latent grids have few
            tokens per axis, so short wavelengths are needed to tell neighbouring positions apart (10 rather
            than the 10000 meant for sequences of thousands).
    """

    _supports_gradient_checkpointing = False  # applied from outside (frameloom.parallel)
    _no_split_modules = ["_Block"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int | Sequence[int] = (1, 2, 2),
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        text_dim: int = 4096,
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        norm_eps: float = 1e-6,
        frequency_embedding_size: int = 256,
        timestep_scale: float = 1000.0,
        pooled_text: bool = False,
        absolute_pos_embed: bool = False,
        velocity_skip: bool = False,
        positional_conditioning: bool = False,
        pos_cond_theta: float = 10.0,
    ) -> None:
        super().__init__()
        if isinstance(patch_size, int):
            patch_size = (1, patch_size, patch_size)
        if len(patch_size) != 3:
            raise ValueError(f"patch_size must be (pt, ph, pw), got {patch_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch = tuple(int(p) for p in patch_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.timestep_scale = timestep_scale
        self.frequency_embedding_size = frequency_embedding_size
        self.absolute_pos_embed = absolute_pos_embed
        self.velocity_skip = velocity_skip
        if velocity_skip and self.out_channels != in_channels:
            raise ValueError("velocity_skip needs out_channels == in_channels")
        rope_axes_dims(self.head_dim)  # validates head_dim for 3D RoPE early
        pt, ph, pw = self.patch

        self.patch_embed = nn.Linear(in_channels * pt * ph * pw, hidden_size)
        self.t_embedder = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_proj = None
        if pooled_text:
            self.register_buffer("text_mean", torch.zeros(text_dim))
            self.register_buffer("text_std", torch.ones(text_dim))
            self.pooled_proj = nn.Sequential(
                nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.pos_cond_theta = pos_cond_theta
        pos_in = hidden_size + (text_dim if pooled_text else 0)  # position (+ standardized pooled text)
        self.pos_cond = (
            nn.Sequential(nn.Linear(pos_in, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if positional_conditioning
            else None
        )
        self.blocks = nn.ModuleList(
            [_Block(hidden_size, num_heads, mlp_ratio, qk_norm, norm_eps) for _ in range(depth)]
        )
        self.final_layer = _FinalLayer(hidden_size, pt * ph * pw * self.out_channels, norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embedders, zero adaLN modulation and final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embedder[0], self.t_embedder[2], self.text_proj[0], self.text_proj[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ----------------------------------------------------------------------------------------------------
    # patch <-> token reshapes (public so that packing code can build token sequences itself)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``(B, C, T, H, W)`` -> patches ``(B, T'*H'*W', C*pt*ph*pw)`` and the grid ``(T', H', W')``."""
        B, C, T, H, W = x.shape
        pt, ph, pw = self.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(
                f"input grid (T, H, W) = {(T, H, W)} is not divisible by patch size {self.patch}"
            )
        gt, gh, gw = T // pt, H // ph, W // pw
        x = x.reshape(B, C, gt, pt, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
        return x.reshape(B, gt * gh * gw, C * pt * ph * pw), (gt, gh, gw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(B, T'*H'*W', pt*ph*pw*C_out)`` -> ``(B, C_out, T, H, W)`` (inverse of :meth:`patchify`)."""
        B = tokens.shape[0]
        gt, gh, gw = grid
        pt, ph, pw = self.patch
        C = self.out_channels
        x = tokens.reshape(B, gt, gh, gw, C, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
        return x.reshape(B, C, gt * pt, gh * ph, gw * pw)

    # ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _prepare_attn_mask(attn_mask: torch.Tensor | None, B: int, N: int, dtype: torch.dtype):
        """Normalise a self-attention mask to ``(B|1, 1, N, N)``; bool rows with no key attend themselves."""
        if attn_mask is None:
            return None
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None]
        if attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # (B, 1, N, N)
        if attn_mask.dim() != 4 or attn_mask.shape[-2:] != (N, N) or attn_mask.shape[0] not in (1, B):
            raise ValueError(f"attn_mask must be (B, N, N) or (B, 1, N, N) with N={N}, got {attn_mask.shape}")
        if attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(dim=-1, keepdim=True)  # (B, 1, N, 1): rows that would give NaN
            eye = torch.eye(N, dtype=torch.bool, device=attn_mask.device)
            return attn_mask | (empty & eye)
        return attn_mask.to(dtype)

    @property
    def wants_text_statistics(self) -> bool:
        """True when the pooled text is standardized (the trainer then calls :meth:`set_text_statistics`)."""
        return self.pooled_proj is not None

    @torch.no_grad()
    def set_text_statistics(self, pooled: torch.Tensor) -> None:
        """Set the per-channel mean/std that standardize the pooled text (``pooled_text``), from the pooled
        embeddings of the training captions, ``(N, text_dim)`` (see :func:`pool_text`). Saved with the weights."""
        if self.pooled_proj is None:
            return
        self.text_mean.copy_(pooled.float().mean(0))
        self.text_std.copy_(pooled.float().std(0).clamp(min=1e-4) if len(pooled) > 1 else self.text_std)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity (or whatever the objective trains) for noisy latents.

        Args:
            x: noisy latents ``(B, C, T, H, W)``; ``T, H, W`` divisible by the patch size.
            timestep: ``(B,)`` (or scalar) float flow time in ``[0, 1]``; scaled by ``timestep_scale`` inside.
            text: text-encoder embeddings ``(B, L, text_dim)``.
            text_mask: ``(B, L)`` bool, True = real token. Padding keys are ignored. A row with no real token
                gets a zero cross-attention output (as if it attended a single all-zero null token), so it is
                finite and equivalent to "no text".
            attn_mask: optional self-attention mask over the ``N = T'*H'*W'`` tokens, ``(B, N, N)`` or
                ``(B, 1, N, N)``: bool (True = may attend) or additive float. Used to pack several sequences
                into one (block-diagonal mask). A bool row with no allowed key attends only to itself.
            positions: optional ``(N, 3)`` or ``(B, N, 3)`` float (t, h, w) RoPE coordinates overriding the
                integer patch-grid coordinates (e.g. offsets for packed sequences, or fractional positions
                of interpolated low-resolution history as in Pyramid Flow).

        Returns:
            ``(B, C_out, T, H, W)``.
        """
        B = x.shape[0]
        dtype = self.patch_embed.weight.dtype

        # 1. patchify and embed: (B, C, T, H, W) -> (B, N, D), N = T'*H'*W'
        patches, grid = self.patchify(x.to(dtype))  # (B, N, C*pt*ph*pw)
        h = self.patch_embed(patches)  # (B, N, D)
        N = h.shape[1]

        # 2. 3D RoPE rotations, shared by all blocks: complex (N, hd/2) or (B, N, hd/2)
        if positions is None:
            positions = grid_positions(*grid, device=x.device)  # (N, 3)
        elif positions.shape[-2:] != (N, 3):
            raise ValueError(
                f"positions must be (N, 3) or (B, N, 3) with N={N}, got {tuple(positions.shape)}"
            )
        rope = rope_freqs(positions, self.head_dim, self.rope_theta)
        if self.absolute_pos_embed:
            h = h + sincos_embedding(positions, self.hidden_size).to(h.dtype)  # (N or B, N, D) broadcast

        # 3. timestep conditioning: (B,) -> (B, D)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(B)
        t_freq = timestep_embedding(timestep * self.timestep_scale, self.frequency_embedding_size)
        c = self.t_embedder(t_freq.to(dtype))  # (B, D)

        # 4. text tokens and masks: (B, L, text_dim) -> (B, L, D); mask -> (B, 1, 1, L)
        txt = self.text_proj(text.to(dtype))  # (B, L, D)
        sdpa_text_mask = text_keep = None
        if text_mask is not None:
            text_mask = text_mask.to(device=x.device, dtype=torch.bool)
            has_text = text_mask.any(dim=-1, keepdim=True)  # (B, 1)
            sdpa_text_mask = (text_mask | ~has_text)[:, None, None, :]  # (B, 1, 1, L), never an empty row
            text_keep = has_text.to(dtype)[:, :, None, None]  # (B, 1, 1, 1)
        self_mask = self._prepare_attn_mask(attn_mask, B, N, dtype)
        pooled = None
        if self.pooled_proj is not None:  # standardized masked mean: (B, L, text_dim) -> (B, text_dim)
            # standardized in fp32 with the fp32 statistics (buffers keep fp32 under FSDP mixed precision), then
            # cast to the weights' dtype: without autocast an fp32 result would meet bf16 weights
            pooled = ((pool_text(text.float(), text_mask) - self.text_mean) / self.text_std).to(dtype)
            c = c + self.pooled_proj(pooled)  # (B, D)

        c = c[:, None]  # (B, 1, D): one conditioning vector per sample ...
        if self.pos_cond is not None:  # ... or per token: (B, N, D)
            pe = sincos_embedding(positions, self.hidden_size, self.pos_cond_theta).to(dtype)  # ([B,] N, D)
            pe = pe.expand(B, N, -1)
            if pooled is not None:
                pe = torch.cat([pe, pooled[:, None].expand(B, N, -1)], dim=-1)  # (B, N, D + text_dim)
            c = c + self.pos_cond(pe)

        # 5. transformer blocks: (B, N, D) -> (B, N, D)
        for block in self.blocks:
            h = block(h, c, txt, rope, self_mask, sdpa_text_mask, text_keep)

        # 6. final adaLN + projection, unpatchify: (B, N, D) -> (B, N, pt*ph*pw*C_out) -> (B, C_out, T, H, W)
        out = self.unpatchify(self.final_layer(h, c), grid)
        if self.velocity_skip:  # EDM-style skip: t * x_t carries the noise part of the velocity
            out = out + timestep.to(out.dtype).view(B, 1, 1, 1, 1) * x.to(out.dtype)
        return out
