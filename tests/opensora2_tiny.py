"""Tiny Open-Sora 2.0 pieces the opensora2 tests share: a diffusers-saved HunyuanVideo VAE, a DC-AE file, an
Open-Sora CSV of synthetic clips, the MMDiT config and the override list of a tiny run."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import torch

from frameloom.data import synthetic
from frameloom.data.manifest import read_manifest

#: A 2-block MMDiT (head dim 16 = 4 + 6 + 6) over the tiny VAE's 4 channels at patch 2.
MMDIT = (
    "{hidden_size: 32, num_heads: 2, depth: 1, depth_single_blocks: 1, axes_dim: [4, 6, 6], mlp_ratio: 2.0"
)
TEXT = "clip: tiny-clip, clip_max_length: 16"
#: The tiny VAE: HunyuanVideo's layout (4x time causal, 8x space) with 8 channels per level, 4 latent channels.
VAE = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4, layers_per_block=1)
#: A DC-AE with 3 stages: 4x space, 2x time (boundary 0), 8 latent channels, one attention stage.
DCAE = dict(
    latent_channels=8,
    encoder_widths=[8, 16, 16],
    encoder_depths=[1, 1, 1],
    decoder_widths=[8, 16, 16],
    decoder_depths=[1, 1, 1],
    block_types=["res", "res", "vit"],
    temporal_downsample=[True, False, False],
    attention_head_dim=8,
)


def redraw(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter from N(0, std) with a fixed seed (zero-initialised layers would make outputs equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def build_vae(root: Path) -> Path:
    """A random-init tiny ``AutoencoderKLHunyuanVideo`` saved with ``save_pretrained`` into ``root/vae``."""
    from diffusers import AutoencoderKLHunyuanVideo

    out = root / "vae"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKLHunyuanVideo(**VAE).save_pretrained(str(out))
    return out


def build_dc_ae(root: Path) -> Path:
    """A random tiny DC-AE saved as a released-layout ``.safetensors`` file."""
    from safetensors.torch import save_file

    from frameloom.models.opensora2.dc_ae import DCAEConfig, VideoDCAE

    path = root / "dc_ae.safetensors"
    if not path.exists():
        model = redraw(VideoDCAE(DCAEConfig(**DCAE)), seed=3, std=0.1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_csv(root: Path, num_clips: int = 4, size: int = 32, frames: int = 9) -> Path:
    """Synthetic clips and an Open-Sora CSV for them (``path,text,num_frames,height,width,aspect_ratio,
    resolution,fps`` plus ``score_vmafmotion``, Open-Sora's motion score column)."""
    synthetic.write_synthetic_set(root, num_clips=num_clips, seed=0, height=size, width=size, num_frames=frames,
                                  fps=24, progress=False)  # fmt: skip
    table = read_manifest(root / "manifest.parquet")
    n = table.num_rows
    cols = {
        "path": table.column("path").to_pylist(),
        "text": table.column("text").to_pylist(),
        "num_frames": [frames] * n,
        "height": [size] * n,
        "width": [size] * n,
        "aspect_ratio": [1.0] * n,
        "resolution": [size * size] * n,
        "fps": [24.0] * n,
        "score_vmafmotion": [2.6 + i for i in range(n)],
    }
    path = root / "data.csv"
    pacsv.write_csv(pa.table(cols), path)
    return path


def overrides(root: Path, csv: Path, run: str, *extra: str) -> list[str]:
    """A tiny opensora2 run on ``csv`` (32 x 32 pixels, 5 frames: latent 2 x 4 x 4, 8 tokens)."""
    return [
        "model.family=opensora2",
        f"model.codec={build_vae(root)}",
        "model.text_encoder=tiny-byt5",
        "model.text_max_length=16",
        f"model.config={MMDIT}, {TEXT}}}",
        f"data.manifest={csv}",
        "data.num_frames=5",
        "data.height=32",
        "data.width=32",
        "train.batch_size=2",
        "train.ema_decay=0",
        "train.progress=false",
        "logging.tensorboard=false",
        "optim.lr=1e-3",
        "checkpoint.every=0",
        "sample.steps=2",
        f"run_dir={root / 'runs' / run}",
        *extra,
    ]
