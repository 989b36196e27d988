"""Sampled images as files: one PNG per image, and the ``.npz`` sample batch FID tools read.

The ``.npz`` follows DiT's ``sample_ddp.py`` / the ADM evaluation suite (openai/guided-diffusion
``evaluations/evaluator.py``): one array ``arr_0`` of uint8 ``(N, H, W, 3)``, pixels ``clamp(127.5 x + 128)``
of samples ``x`` in [-1, 1] (DiT's rounding: 128, not 127.5, then truncation to uint8).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from frameloom.errors import FrameloomError
from frameloom.sampling.video_io import to_uint8

__all__ = ["fid_uint8", "write_npz", "write_png"]


def write_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """``image`` (3, H, W) or (3, 1, H, W), float in [-1, 1] or uint8 -> an RGB PNG at ``path`` (atomic)."""
    from PIL import Image

    if image.dim() == 4:
        if image.shape[1] != 1:
            raise FrameloomError(f"a PNG holds one frame, got {image.shape[1]}")
        image = image[:, 0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise FrameloomError(f"image must be shaped (3, H, W), got {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = to_uint8(image).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def fid_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, [1,] H, W) floats in [-1, 1] -> (N, H, W, 3) uint8 as DiT's ``sample_ddp.py`` converts them:
    ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8."""
    if images.dim() == 5:
        images = images[:, :, 0]
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1)
    return x.to(torch.uint8).cpu().numpy()


def write_npz(arrays: np.ndarray, path: str | os.PathLike) -> Path:
    """Save ``arr_0`` = ``arrays`` (N, H, W, 3) uint8 at ``path`` (written to a temporary name, then renamed)."""
    if arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[-1] != 3:
        raise FrameloomError(f"the FID batch must be uint8 (N, H, W, 3), got {arrays.dtype} {arrays.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, arr_0=arrays)
    os.replace(tmp, path)
    return path
