"""3D rotary position embedding (RoPE) for video tokens: pure functions, no state.

RoPE (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021) rotates each pair of
query/key channels by an angle proportional to the token's position, so that the attention logit
``q_m . k_n`` depends on the positions only through ``m - n``. Video DiTs (e.g. Open-Sora 2.0 / Flux-style
MMDiT, HunyuanVideo, CogVideoX 1.5, Wan) use a 3D variant: the head dimension is split into three parts, one
per axis (time, height, width), and each part is rotated by the coordinate along its own axis. Here the split
is about 1/4 of the channels for time and 3/8 each for height and width, every part an even number.

Positions are float so that callers may pass fractional coordinates (e.g. Pyramid Flow interpolates the
spatial positions of low-resolution history onto the current grid); by default they are the integer grid
coordinates ``(t, h, w)`` of each patch, in row-major (t, h, w) token order.

Channel pairing is interleaved: channels ``(2i, 2i + 1)`` are rotated together, as one complex number.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "grid_positions", "rope_angles", "rope_axes_dims", "rope_freqs"]


def rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Split ``head_dim`` into (time, height, width) rotary dims: about 1/4, 3/8, 3/8, each even.

    >>> rope_axes_dims(64)
    (16, 24, 24)
    >>> rope_axes_dims(72)
    (18, 26, 28)
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    d_t = 2 * max(1, head_dim // 8)
    d_h = 2 * max(1, (3 * head_dim) // 16)
    d_w = head_dim - d_t - d_h
    if d_w < 2:  # only for very small head dims
        d_h -= 2
        d_w += 2
    return d_t, d_h, d_w


def grid_positions(
    t: int, h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Integer grid coordinates of a ``t x h x w`` token grid in row-major order: ``(t*h*w, 3)``."""
    tt = torch.arange(t, device=device, dtype=dtype)
    hh = torch.arange(h, device=device, dtype=dtype)
    ww = torch.arange(w, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij"), dim=-1)  # (t, h, w, 3)
    return grid.reshape(-1, 3)  # (t*h*w, 3)


def _inv_freq(dim: int, theta: float, device: torch.device | None) -> torch.Tensor:
    """Per-pair inverse frequencies ``theta ** (-2i / dim)`` for ``i < dim / 2`` (RoFormer eq. 15)."""
    return theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 3D positions, one per channel pair.

    Args:
        positions: ``(..., N, 3)`` float (t, h, w) coordinates; integer grid positions or fractional ones.
        head_dim: attention head dimension (split across the three axes by :func:`rope_axes_dims`).
        theta: RoPE base.

    Returns:
        ``(..., N, head_dim / 2)`` float32: the first ``d_t / 2`` pairs rotate with ``t``, the next
        ``d_h / 2`` with ``h``, the last ``d_w / 2`` with ``w``.
    """
    if positions.shape[-1] != 3:
        raise ValueError(f"positions must end in 3 coordinates (t, h, w), got shape {tuple(positions.shape)}")
    pos = positions.to(torch.float32)  # float32 everywhere (float64 is missing on some accelerators)
    parts = []
    for axis, dim in enumerate(rope_axes_dims(head_dim)):
        inv = _inv_freq(dim, theta, pos.device)  # (dim/2,)
        parts.append(pos[..., axis : axis + 1] * inv)  # (..., N, dim/2)
    return torch.cat(parts, dim=-1)  # (..., N, head_dim/2)


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations ``exp(i * angle)`` for :func:`apply_rope`, complex64 ``(..., N, hd / 2)``."""
    angles = rope_angles(positions, head_dim, theta)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, N, heads, head_dim)`` by the complex rotations ``freqs`` from :func:`rope_freqs`.

    ``freqs`` is ``(N, head_dim / 2)`` (shared by the batch) or ``(B, N, head_dim / 2)``. Channels
    ``(2i, 2i + 1)`` form the ``i``-th complex number (one complex multiply: fastest on CPU and GPU). Computed
    in float32, returned in ``x.dtype``.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, N, heads, head_dim/2)
    out = torch.view_as_real(xc * freqs.unsqueeze(-2))  # (B, N, heads, head_dim/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, N, heads, head_dim)


def sincos_embedding(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Fixed absolute 3D sine-cosine position embedding, ``(..., N, 3)`` -> ``(..., N, dim)``.

    The width is split across (t, h, w) like the rotary dims (:func:`rope_axes_dims`); each part holds
    ``[sin(p * f_i), cos(p * f_i)]`` with ``f_i = theta ** (-2i / part)`` (Transformer sinusoids, applied per
    axis as in CogVideoX-2B's 3D sincos embedding). RoPE alone only tells a token where others are *relative*
    to it; a frame that must know it is the first (to start a motion on the correct side) needs this.
    """
    pos = positions.to(torch.float32)
    parts = []
    for axis, part in enumerate(rope_axes_dims(dim)):
        inv = _inv_freq(part, theta, pos.device)  # (part/2,)
        angles = pos[..., axis : axis + 1] * inv  # (..., N, part/2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)  # (..., N, dim)
