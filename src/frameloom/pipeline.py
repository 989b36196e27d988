"""Builds the pieces a run needs from its config: device, clip spec, codec, text encoder, cache, datasets.

Shared by `cache`, `train`, `sample` and the quickstart so that each of them turns a config into components
in exactly one way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from frameloom.config.schema import Config
from frameloom.data.manifest import read_manifest
from frameloom.data.video import ClipSpec, decode_clip
from frameloom.errors import FrameloomError

TINY_BYT5 = "tiny-byt5"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FrameloomError("train.device is cuda but no CUDA device is available")
    return torch.device(name)


def clip_spec(cfg: Config) -> ClipSpec:
    d = cfg.data
    if d.frame_stride is not None and d.target_fps is not None:
        raise FrameloomError("set at most one of data.frame_stride and data.target_fps")
    return ClipSpec(
        num_frames=d.num_frames,
        frame_stride=d.frame_stride,
        target_fps=d.target_fps,
        height=d.height,
        width=d.width,
    )


def manifest_path(cfg: Config) -> Path:
    if not cfg.data.manifest:
        raise FrameloomError("data.manifest is not set (pass data.manifest=PATH)")
    path = Path(cfg.data.manifest)
    if not path.exists():
        raise FrameloomError(f"data.manifest not found: {path}")
    return path


def cache_root(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return manifest_path(cfg).resolve().parent / ".frameloom_cache"


def load_codec(cfg: Config, device: torch.device | str = "cpu"):
    from frameloom.models.codecs import DiffusersVAECodec, PixelCodec
    from frameloom.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.load_codec is not None:
        return family.load_codec(cfg, torch.device(device))
    if cfg.model.codec == "pixel":
        return PixelCodec()
    path = Path(cfg.model.codec)
    if not path.is_dir():
        raise FrameloomError(f"model.codec: not 'pixel' and not a directory: {path}")
    return DiffusersVAECodec.from_pretrained(path).to(device)


def text_encoder_dir(cfg: Config) -> Path:
    """The encoder's directory; `tiny-byt5` is built (deterministically, seed 0) beside the run on first use."""
    name = cfg.model.text_encoder
    if name is None:
        raise FrameloomError("model.text_encoder is not set (a local T5 directory, or tiny-byt5)")
    if name == TINY_BYT5:
        from frameloom.models.text import build_tiny_t5

        path = Path(cfg.run_dir).resolve().parent / ".frameloom_models" / TINY_BYT5
        if not (path / "config.json").exists():
            build_tiny_t5(path, seed=0)
        return path
    path = Path(name)
    if not path.is_dir():
        raise FrameloomError(f"model.text_encoder: not a directory: {path}")
    return path


def load_text_encoder(cfg: Config, device: torch.device | str = "cpu"):
    from frameloom.models.registry import get_family
    from frameloom.models.text import T5TextEncoder

    family = get_family(cfg.model.family)
    if family.load_text_encoder is not None:
        return family.load_text_encoder(cfg, torch.device(device))
    return T5TextEncoder.from_pretrained(text_encoder_dir(cfg), max_length=cfg.model.text_max_length).to(
        device
    )


def open_store(cfg: Config):
    from frameloom.cache.store import CacheStore

    return CacheStore(cache_root(cfg))


def run_cache(cfg: Config, *, progress: bool = True, shard: tuple[int, int] = (0, 1)):
    """`frameloom cache`: encode every row's clip and caption into the content-keyed store."""
    from frameloom.cache.builder import build_cache

    device = resolve_device(cfg.train.device)
    return build_cache(
        manifest_path(cfg),
        spec=clip_spec(cfg),
        codec=load_codec(cfg, device),
        text_encoder=load_text_encoder(cfg, device),
        store=open_store(cfg),
        progress=progress,
        shard=shard,
    )


class ClipDataset(Dataset):
    """On-the-fly clips (used when the cache is incomplete): item i -> video float (C, T, H, W) and caption."""

    def __init__(self, manifest: str | Path, spec: ClipSpec):
        self.manifest = Path(manifest)
        self.rows = read_manifest(self.manifest).to_pylist()  # decode_clip reads cut/crop/rotation too
        self.spec = spec
        self.root = self.manifest.resolve().parent

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        video = decode_clip(row, self.spec, root=self.root, output="float")
        return {"video": video, "text": row["text"] or "", "index": i}
