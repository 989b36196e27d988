"""frameloom's own video DiT (single device; parallelized from outside) and its size presets."""

from __future__ import annotations

from typing import Any

from .model import VideoDiT
from .rope import apply_rope, grid_positions, rope_angles, rope_axes_dims, rope_freqs

#: Size presets (width, depth, heads). S/B/L/XL are the DiT paper's sizes (Peebles & Xie, 2023, Table 1);
#: "tiny" is for tests and the CPU quickstart. Combine with the data-dependent arguments, e.g.
#: ``VideoDiT(in_channels=4, text_dim=512, patch_size=(1, 2, 2), **DIT_PRESETS["B"])``.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

__all__ = [
    "DIT_PRESETS",
    "VideoDiT",
    "apply_rope",
    "grid_positions",
    "rope_angles",
    "rope_axes_dims",
    "rope_freqs",
]
