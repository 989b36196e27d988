"""Skiparse attention of Open-Sora-Plan v1.3: which blocks are sparse, and the token rearrangement.

Skiparse (Open-Sora-Plan report v1.3, "Skiparse Attention"; code: ``opensora/models/diffusion/opensora_v1_3/
modules.py`` ``OpenSoraAttnProcessor2_0._sparse_1d``) turns full self-attention over ``L`` video tokens into
``n`` independent attentions over ``L / n`` tokens each, by moving groups of tokens into the batch dimension:

- single skip (even blocks): token ``i`` goes to group ``i mod n``: every ``n``-th token attends together;
- group skip (odd blocks): token ``i`` goes to group ``(i // n) mod n``: runs of ``n`` consecutive tokens,
  ``n^2`` apart, attend together.

The sequence is first padded with zeros to a multiple of ``n^2``; padded keys are masked out (an additive
``-10000`` as upstream, so a query never has every key masked) and padded queries dropped after the inverse
rearrangement. Rotary positions are applied before the rearrangement, so every token keeps its own position.
In the 32-block v1.3 model blocks 2..29 are sparse (``sparse1d``), odd ones group skip; blocks 0, 1, 30 and 31
are dense. The rule is by absolute block index, also for smaller models (as upstream).

Cross-attention of a sparse block is left dense here: upstream rearranges its queries the same way and repeats
the text keys/values ``n`` times, which gives every query exactly the dense result (a query's cross-attention
depends on that query and all text tokens only), so the rearrangement there is a no-op in value.

Layout here: ``(B, heads, L, head_dim)``; the grouped batch is ordered ``(group, batch)`` like upstream's
``(k b)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_kind",
    "skiparse",
    "skiparse_key_bias",
    "skiparse_pad",
    "unskiparse",
]

#: Additive bias on masked keys (upstream's value: softmax weight exp(-10000) = 0 in float32 and bfloat16).
MASKED = -10000.0


def block_kind(index: int, sparse1d: bool) -> str | None:
    """``None`` (dense), ``"single"`` or ``"group"`` for block ``index`` (upstream: sparse for 1 < i < 30,
    ``sparse_group = i % 2 == 1``)."""
    if not sparse1d or not 1 < index < 30:
        return None
    return "group" if index % 2 == 1 else "single"


def skiparse_pad(length: int, n: int) -> int:
    """Tokens added so that the sequence is a multiple of ``n^2``."""
    return (-length) % (n * n)


def skiparse(x: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    """``(B, H, L, d)`` -> ``(n B, H, L / n, d)`` (``L`` a multiple of ``n^2``): group ``j`` of batch ``b`` is
    row ``j B + b``; single skip: tokens ``j, j + n, ...``; group skip: tokens ``j n .. j n + n - 1``,
    ``j n + n^2 ..``, ... in order."""
    b, h, length, d = x.shape
    if kind == "single":
        x = x.reshape(b, h, length // n, n, d)  # token g n + j -> (g, j)
        return x.permute(3, 0, 1, 2, 4).reshape(n * b, h, length // n, d)
    if kind == "group":
        x = x.reshape(b, h, length // (n * n), n, n, d)  # token (a n + j) n + k -> (a, j, k)
        return x.permute(3, 0, 1, 2, 4, 5).reshape(n * b, h, length // n, d)
    raise ValueError(f"unknown skiparse kind {kind!r}")


def unskiparse(x: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    """The inverse of ``skiparse``: ``(n B, H, L / n, d)`` -> ``(B, H, L, d)``."""
    nb, h, part, d = x.shape
    b = nb // n
    if kind == "single":
        x = x.reshape(n, b, h, part, d).permute(1, 2, 3, 0, 4)  # (B, H, g, j, d)
        return x.reshape(b, h, part * n, d)
    if kind == "group":
        x = x.reshape(n, b, h, part // n, n, d).permute(1, 2, 3, 0, 4, 5)  # (B, H, a, j, k, d)
        return x.reshape(b, h, part * n, d)
    raise ValueError(f"unknown skiparse kind {kind!r}")


def skiparse_key_bias(
    length: int, n: int, kind: str, batch: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The additive key mask ``(n B, 1, 1, L_pad / n)`` of the padded tokens after ``skiparse`` (0 for real
    tokens, ``MASKED`` for padding); None when no padding is needed."""
    pad = skiparse_pad(length, n)
    if pad == 0:
        return None
    valid = torch.arange(length + pad, device=device) < length  # (L_pad,)
    bias = torch.where(valid, 0.0, MASKED).to(dtype).view(1, 1, -1, 1)
    bias = skiparse(bias, n, kind)  # (n, 1, L_pad / n, 1)
    return bias.reshape(n, 1, 1, -1).repeat_interleave(batch, dim=0)  # rows ordered (group, batch)
