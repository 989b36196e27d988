"""DiT's image preprocessing (ADM's ``center_crop_arr``), for class-conditional image training.

ADM / DiT (``train.py``, fast-DiT ``extract_features.py``): while the short side is at least twice the target,
halve the image with a BOX filter; then resize with BICUBIC so the short side equals the target (sizes rounded);
then crop the center (offsets ``(size - target) // 2``). frameloom's default ``cover`` resize has the same
geometry with an antialiased bilinear filter; ``data.resize: adm`` reproduces the seed's pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from frameloom.errors import FrameloomError

__all__ = ["adm_center_crop", "center_crop_arr"]


def center_crop_arr(image, size: int):
    """ADM's ``center_crop_arr`` on one PIL image: BOX halvings, BICUBIC to ``size`` on the short side, center
    crop to ``size`` x ``size``; returns a PIL image."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def adm_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``center_crop_arr`` on every frame of ``video`` (C=3, T, H, W) holding 0..255 values (uint8, or float
    decoded from uint8); returns the same dtype, (3, T, size, size). ADM crops squares only."""
    from PIL import Image

    if height != width:
        raise FrameloomError(f"data.resize adm crops squares (DiT's center_crop_arr), not {height}x{width}")
    frames = video.permute(1, 2, 3, 0).round().clamp(0, 255).to(torch.uint8).numpy()  # (T, H, W, 3)
    out = np.stack([np.array(center_crop_arr(Image.fromarray(f), height)) for f in frames])
    return torch.from_numpy(out).permute(3, 0, 1, 2).to(video.dtype)  # (3, T, size, size)
