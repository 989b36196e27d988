"""Open-Sora 2.0's 3-axis rotary position embedding, in both channel pairings: pure functions, no state.

RoPE (Su et al., "RoFormer", 2021) rotates pairs of query/key channels by ``angle = position * omega``. Flux
and Open-Sora 2.0 split the head dimension into one part per axis (``axes_dim``, [16, 56, 56] for (t, h, w)
at head_dim 128); part ``a`` has ``axes_dim[a] / 2`` frequencies ``omega_i = theta ** (-2i / axes_dim[a])``
applied to the token's coordinate on axis ``a``. Concatenated over the axes that gives ``head_dim / 2``
angles per token (``rope_angles``).

The two systems pair the channels differently (hpcaitech/Open-Sora ``opensora/models/mmdit/math.py``):

- **interleaved** (Flux, ``EmbedND`` + ``apply_rope``): angle ``i`` rotates channels ``(2i, 2i + 1)``;
- **rotate-half** (Open-Sora 2.0 with ``use_liger_rope``, the released model's layout): angle ``i`` rotates
  channels ``(i, i + head_dim / 2)``; the cos/sin table is the angle table repeated twice
  (``LigerEmbedND``, ``LigerRopeFunction``).

Both compute ``(a, b) -> (a cos - b sin, a sin + b cos)`` for their pair, so rotate-half on channels
permuted by ``interleaved_to_half`` (``[0, 2, 4, ..., 1, 3, 5, ...]``) equals interleaved RoPE on the
original channels, permuted the same way. Converting Flux weights therefore permutes the q/k projection rows
(and the q/k RMSNorm scales) within each head (``models/opensora2/convert.py``). Angles are computed in
float32, as Open-Sora's liger path does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "apply_rope",
    "half_to_interleaved",
    "interleaved_to_half",
    "rope_angles",
    "rope_tables",
    "video_positions",
]


def video_positions(
    t: int, h: int, w: int, text_len: int = 0, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Token coordinates ``(text_len + t*h*w, 3)`` float32: text tokens at (0, 0, 0) first (Open-Sora's
    ``txt_ids`` are zeros), then the video grid in row-major (t, h, w) order (``prepare``'s ``img_ids``)."""
    tt = torch.arange(t, device=device, dtype=torch.float32)
    hh = torch.arange(h, device=device, dtype=torch.float32)
    ww = torch.arange(w, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij"), dim=-1).reshape(-1, 3)  # (t*h*w, 3)
    text = torch.zeros(text_len, 3, device=device, dtype=torch.float32)
    return torch.cat([text, grid])  # (L + t*h*w, 3)


def rope_angles(positions: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Angles ``(..., N, sum(axes_dim) / 2)``: for each axis ``a``, ``pos_a * theta ** (-2i / axes_dim[a])``,
    ``i < axes_dim[a] / 2``, concatenated over the axes (Flux ``rope`` / Open-Sora ``liger_rope``)."""
    if positions.shape[-1] != len(axes_dim):
        raise ValueError(f"positions have {positions.shape[-1]} coordinates, axes_dim has {len(axes_dim)}")
    parts = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"every axes_dim entry must be even, got {list(axes_dim)}")
        omega = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
        parts.append(positions[..., axis : axis + 1].float() * omega)  # (..., N, dim/2)
    return torch.cat(parts, dim=-1)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(..., N, head_dim / 2)`` float32, from :func:`rope_angles`."""
    return angles.cos(), angles.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "rotate_half"
) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, N, head_dim)`` by the tables ``(N, head_dim / 2)``; computed in float32,
    returned in ``x.dtype``.

    ``layout``: ``rotate_half`` pairs channel ``i`` with ``i + head_dim / 2`` (Open-Sora 2.0),
    ``interleaved`` pairs ``(2i, 2i + 1)`` (Flux).
    """
    xf = x.float()
    cos, sin = cos.to(x.device), sin.to(x.device)
    if layout == "rotate_half":
        a, b = xf.chunk(2, dim=-1)  # 2 x (B, heads, N, hd/2)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)
    if layout == "interleaved":
        pairs = xf.unflatten(-1, (-1, 2))  # (B, heads, N, hd/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    raise ValueError(f"unknown RoPE layout {layout!r} (rotate_half or interleaved)")


def interleaved_to_half(head_dim: int) -> torch.Tensor:
    """The channel order that turns an interleaved-pair vector into a rotate-half one: new channel ``j``
    takes old ``2j`` and new ``j + head_dim / 2`` takes old ``2j + 1`` (Open-Sora's ``rearrange_tensor``)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def half_to_interleaved(head_dim: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half` (``reverse_rearrange_tensor``)."""
    return torch.argsort(interleaved_to_half(head_dim))
