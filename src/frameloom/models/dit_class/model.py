"""The class-conditional DiT of Peebles & Xie ("Scalable Diffusion Models with Transformers", 2023), as
facebookresearch/DiT and fast-DiT define it, with the released checkpoints' parameter names.

Patchify (a strided Conv2d) + fixed 2D sin-cos positions -> N blocks of (adaLN-Zero modulated self-attention,
adaLN-Zero modulated tanh-GELU MLP) conditioned on ``c = timestep embedding + class embedding`` -> adaLN final
layer -> unpatchify to ``2 C`` channels (epsilon and the learned-range variance ``v``). The class table has a
"null class" row (index ``num_classes``) for classifier-free guidance.

Names follow the released ``DiT-XL-2-256x256.pt``: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``pos_embed`` (a fixed buffer), ``blocks.i.{attn.qkv, attn.proj, mlp.fc1,
mlp.fc2, adaLN_modulation.1}``, ``final_layer.{adaLN_modulation.1, linear}``.

Frames: a video-shaped input ``(B, C, T, H, W)`` is denoised frame by frame (T folded into the batch); image
models use T = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassDiT", "sincos_2d", "timestep_embedding"]


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0
) -> torch.Tensor:
    """``[cos(t f_k), sin(t f_k)]`` with ``f_k = exp(-ln(max_period) k / (dim/2 - freq_shift))``, (B,) -> (B, dim).

    GLIDE/DiT use ``freq_shift = 0``; diffusers' ``DiTTransformer2DModel`` (``Timesteps(...,
    downscale_freq_shift=1)``) uses 1, which changes every frequency but the first slightly.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's 1D sin-cos: ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-k / (dim/2))``, float64, (M,) -> (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).to(torch.float64) * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """DiT/MAE fixed 2D positions for a ``grid_h x grid_w`` token grid (row-major tokens), (H*W, dim) float32.

    As upstream (``np.meshgrid(grid_w, grid_h)``), the first half of the channels encodes the column (w) index
    and the second half the row (h) index.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos embedding needs a hidden size divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (H, W) each
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (1 + scale) + shift`` with per-sample (B, D) shift/scale over (B, N, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)  # (B, 256) fp32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class _LabelEmbedder(nn.Module):
    """The class table; the null class (row ``num_classes``) exists when ``null_class``. Dropping labels
    for guidance is the trainer's caption dropout (an empty caption reads as the null class), not done here."""

    def __init__(self, num_classes: int, hidden_size: int, null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class _Attention(nn.Module):
    """timm's ``Attention`` (fused qkv with bias, rows ordered q, k, v; heads contiguous) over SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: 6 modulation vectors (shift, scale, gate) x (attention, MLP) from the condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = _Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # (B, D) x 6
        x = x + gate_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class _FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class ClassDiT(nn.Module):
    """DiT with learned sigma and class conditioning (see the module docstring).

    Args:
        input_size: latent height/width the fixed position table is built for (other sizes get their own
            sin-cos table on the fly).
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: the paper's table (S/B/L/XL x 2/4/8).
        num_classes: classes; the table has ``num_classes + 1`` rows with ``null_class``.
        learn_sigma: output ``2 C`` channels (eps, variance) instead of ``C``.
        diffusers_compat: reproduce diffusers' ``DiTTransformer2DModel`` instead of the upstream code: timestep
            frequencies ``/ (128 - 1)`` and MLP LayerNorm eps 1e-5 (upstream ``/ 128`` and 1e-6).
        class_embed_std: initial std of the class table (DiT: 0.02). Only the initialisation: short runs learn
            class conditioning sooner when the classes start apart (docs/dit_class.md, the digits run).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        null_class: bool = True,
        learn_sigma: bool = True,
        diffusers_compat: bool = False,
        class_embed_std: float = 0.02,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = {
            "input_size": input_size,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "num_classes": num_classes,
            "null_class": null_class,
            "learn_sigma": learn_sigma,
            "diffusers_compat": diffusers_compat,
        }
        self.class_embed_std = class_embed_std
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.null_class = null_class
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = _TimestepEmbedder(hidden_size, freq_shift=1.0 if diffusers_compat else 0.0)
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size, null_class)
        grid = input_size // patch_size
        self.register_buffer(
            "pos_embed", sincos_2d(hidden_size, grid, grid)[None], persistent=True
        )  # (1, N, D)
        mlp_eps = 1e-5 if diffusers_compat else 1e-6
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_eps) for _ in range(depth)]
        )
        self.final_layer = _FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def enable_sequence_parallel(self, group) -> None:  # noqa: ARG002
        """Not supported: a DiT image is at most 1,024 tokens (XL/2 at 512px), which one device holds."""
        from frameloom.errors import FrameloomError

        raise FrameloomError("model.family dit_class has no sequence parallelism: use parallel.sp_size 1")

    @property
    def null_label(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and the patch conv as a linear), N(0, 0.02) class and
        timestep tables, zero adaLN modulation and output layers (every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.class_embed_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _positions(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        if self.pos_embed.shape[1] == gh * gw and gh == gw:
            return self.pos_embed.to(like.dtype)
        return sincos_2d(self.pos_embed.shape[-1], gh, gw).to(like.device, like.dtype)[None]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | None = None,  # noqa: ARG002 (the label encoder's dummy token; labels come below)
        mask: torch.Tensor | None = None,  # noqa: ARG002
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, C, H, W) or (B, C, T, H, W); ``t`` (B,) original timesteps; ``class_labels`` (B,) (the
        trainer hands extras over as float: they are rounded back to indices). Returns ``(B, out, [T,] H, W)``."""
        if class_labels is None:
            raise ValueError("ClassDiT needs class_labels (the label encoder's extra 'class_labels')")
        video = x.dim() == 5
        b = x.shape[0]
        frames = x.shape[2] if video else 1
        h, w = x.shape[-2:]
        p = self.patch_size
        gh, gw = h // p, w // p
        # 1. Patchify + fixed positions. Frames go through the same weights as a (1, p, p) 3-D kernel, not a
        # (B*T, C, H, W) view for the 2-D conv: inductor cannot order such a view's strides once shapes are
        # dynamic (torch 2.13, `parallel.compile: model`). Both give identical values on the CPU (tested).
        proj = self.x_embedder.proj
        if video:
            tokens = F.conv3d(x, proj.weight.unsqueeze(2), proj.bias, stride=(1, p, p))  # (B, D, T, gh, gw)
            tokens = tokens.permute(0, 2, 3, 4, 1).reshape(b * frames, gh * gw, -1)  # (B*T, N, D)
            t = t.repeat_interleave(frames)
            class_labels = class_labels.repeat_interleave(frames)
        else:
            tokens = proj(x).flatten(2).transpose(1, 2)  # (B, N, D), N = gh * gw
        tokens = tokens + self._positions(gh, gw, tokens)
        # 2. The condition: timestep + class embedding.
        labels = class_labels.round().long() if class_labels.is_floating_point() else class_labels.long()
        c = self.t_embedder(t) + self.y_embedder(labels)  # (B', D)
        # 3. Blocks, then the adaLN output layer.
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # (B', N, p * p * out)
        # 4. Unpatchify: (B', gh, gw, p, p, out) -> (B', out, gh * p, gw * p).
        out = out.reshape(-1, gh, gw, p, p, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(-1, self.out_channels, gh * p, gw * p)
        if video:
            out = out.unflatten(0, (b, frames)).permute(0, 2, 1, 3, 4)  # (B, out, T, H, W)
        return out
