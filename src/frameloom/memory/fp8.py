"""Weight-only fp8 storage of a frozen base (``model.fp8_base``): half the memory of a bf16 base, compute in bf16.

Each frozen ``nn.Linear`` inside the transformer blocks keeps its weight as float8 e4m3 with one fp32 scale
per output row, ``s_r = max_j |W_rj| / 448`` (448 is e4m3's largest finite value, so every row uses the full
range), ``q = fp8(W / s)``; its forward dequantizes ``W' = q * s`` to the input's dtype and runs the usual
``x W'^T + b``. That is the "scaled fp8" of musubi-tuner (``--fp8_base --fp8_scaled``, per-channel scales)
and of ComfyUI's ``fp8_e4m3fn`` weights with scales; the computation stays in bf16 (or the autocast dtype),
only storage is fp8. The LoRA layers, the embeddings, norms and output head keep ``model.dtype``.

Error: e4m3 keeps 3 mantissa bits, so a weight is off by at most 2^-4 of itself (relative rounding error
<= 6.25%, ~2.3% RMS for Gaussian weights); tests/test_memory_fp8.py measures what that does to a tiny
model's output against the bf16 base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError

__all__ = ["FP8_MAX", "FP8Linear", "dequantize_rows", "quantize_frozen_linears", "quantize_rows"]

#: Largest finite float8 e4m3 (``torch.finfo(torch.float8_e4m3fn).max``).
FP8_MAX = 448.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` weight -> ``(q float8_e4m3fn (out, in), scale fp32 (out, 1))`` with
    ``scale = max|row| / 448`` (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``: e4m3 values are exact in bf16/fp16/fp32, so the only rounding is the
    product's (no fp32 copy of the weight is made for a bf16 computation)."""
    return q.to(dtype) * scale.to(dtype)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose (frozen) weight is stored as fp8 rows with ``weight_scale`` ``(out, 1)``; the
    forward computes in the input's dtype. Made from an ``nn.Linear`` in place by ``quantize_frozen_linears``
    (same module object: PEFT's LoRA wrappers and hooks keep pointing at it)."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        autocast = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)  # (not on meta: the planner)
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        w = dequantize_rows(self.weight, self.weight_scale, dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), w, bias)


def _to_fp8(linear: nn.Linear) -> None:
    q, scale = quantize_rows(linear.weight)
    linear.weight = nn.Parameter(q, requires_grad=False)
    linear.register_buffer("weight_scale", scale.to(linear.weight.device))
    linear.__class__ = FP8Linear


def quantize_frozen_linears(blocks: list[nn.Module]) -> tuple[int, int]:
    """Convert every frozen ``nn.Linear`` inside ``blocks`` (exactly that class: LoRA's own layers and
    already-converted ones are left alone) to ``FP8Linear``; returns (layers converted, bytes saved)."""
    converted, saved = 0, 0
    for block in blocks:
        for module in block.modules():
            if type(module) is not nn.Linear or module.weight.requires_grad:
                continue
            before = module.weight.numel() * module.weight.element_size()
            _to_fp8(module)
            saved += before - module.weight.numel() - module.weight_scale.numel() * 4
            converted += 1
    if converted == 0:
        raise FrameloomError("model.fp8_base: no frozen linear layer in the transformer blocks (LoRA only)")
    return converted, saved
