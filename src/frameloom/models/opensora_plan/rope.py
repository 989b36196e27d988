"""3D rotary positions of Open-Sora-Plan v1.3 (``opensora/models/diffusion/common.py`` ``RoPE3D``).

The head dimension is cut in three equal parts ``D = head_dim / 3`` (time, height, width); each part is
rotated by its axis position with the "rotate half" pairing (dimension ``j`` with ``j + D/2``) and frequencies
``theta^(-2i / D)``, ``theta = 10000``; positions are divided by the axis's ``interpolation_scale``. Tokens are
ordered time-major, then height, then width (the patch grid flattened). Su et al., "RoFormer", 2021.

frameloom computes the angles in float32 and rotates in float32 (upstream casts the angles to the activations'
dtype first, which in bfloat16 rounds positions above 256): identical in float32.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope_3d", "rope_3d_tables"]


def _axis_table(length: int, dim: int, scale: float, theta: float, device) -> torch.Tensor:
    """Angles ``(length, dim)`` of one axis: ``pos / scale * theta^(-2i/dim)``, the ``dim/2`` frequencies
    repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device).float() / dim))  # (dim/2,)
    pos = torch.arange(length, device=device, dtype=torch.float32) / scale
    freqs = torch.outer(pos, inv_freq)  # (length, dim/2)
    return torch.cat([freqs, freqs], dim=-1)


def rope_3d_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(t h w, 3, head_dim / 3)`` float32, for a ``grid = (t, h, w)`` of tokens."""
    if head_dim % 6:
        raise ValueError(f"3D RoPE needs a head dimension divisible by 6, got {head_dim}")
    d = head_dim // 3
    t, h, w = grid
    at, ah, aw = (_axis_table(n, d, s, theta, device) for n, s in zip(grid, scales))
    angles = torch.stack(
        [
            at[:, None, None].expand(t, h, w, d),
            ah[None, :, None].expand(t, h, w, d),
            aw[None, None, :].expand(t, h, w, d),
        ],
        dim=3,
    ).reshape(t * h * w, 3, d)  # (N, 3, D)
    return angles.cos(), angles.sin()


def apply_rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, head_dim)`` by the tables of ``rope_3d_tables`` (computed in float32)."""
    b, h, n, hd = x.shape
    xf = x.float().reshape(b, h, n, 3, hd // 3)  # (B, H, N, 3, D)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate half, within each axis part
    out = xf * cos + rotated * sin
    return out.reshape(b, h, n, hd).to(x.dtype)
