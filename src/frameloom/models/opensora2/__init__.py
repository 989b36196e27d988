"""Open-Sora 2.0 (hpcaitech/Open-Sora): its MMDiT, video DC-AE, HunyuanVideo VAE codec, T5 + CLIP text
encoder, recipe and the Flux-dev converter (docs/opensora2.md). The family hooks are in ``family.py``."""

from .dc_ae import DCAEConfig, VideoDCAE
from .model import MMDiTConfig, OpenSoraMMDiT

__all__ = ["DCAEConfig", "MMDiTConfig", "OpenSoraMMDiT", "VideoDCAE"]
