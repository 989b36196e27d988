"""Content-keyed cache of latents and caption embeddings (see DESIGN.md, "cache/").

``keys`` names entries after exactly what determines them, ``store`` writes them atomically as safetensors
files, ``builder`` fills the store resumably from a manifest, and ``dataset`` reads training samples back.
"""

from frameloom.cache.builder import CacheReport, build_cache
from frameloom.cache.dataset import CachedClipDataset, CacheMissError, collate_text
from frameloom.cache.keys import caption, file_identity, row_video_key, row_view, text_key, video_key
from frameloom.cache.store import KINDS, CacheStore

__all__ = [
    "CacheMissError",
    "CacheReport",
    "CacheStore",
    "CachedClipDataset",
    "KINDS",
    "build_cache",
    "caption",
    "collate_text",
    "file_identity",
    "row_video_key",
    "row_view",
    "text_key",
    "video_key",
]
