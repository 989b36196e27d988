"""Read training samples from the cache: a manifest's rows as (latent, caption embedding) pairs.

All keys are computed once, at construction (one ``file_identity`` per distinct file), so ``__getitem__`` is
two file reads. ``missing()`` tells the trainer whether the cache covers the whole manifest; it uses the cache
only when nothing is missing and encodes on the fly otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from frameloom.cache.keys import caption, row_video_key, text_key
from frameloom.cache.store import CacheStore
from frameloom.data.manifest import iter_rows, read_manifest
from frameloom.data.video import ClipSpec
from frameloom.errors import FrameloomError

__all__ = ["CachedClipDataset", "CacheMissError", "collate_text"]


class CacheMissError(FrameloomError):
    """A sample whose latent or caption embedding is not in the cache (run ``frameloom cache`` first)."""


def collate_text(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a batch of items; pad the text to the batch's longest caption with zeros and mask ``False``.

    Returns ``latent (B, C, t, h, w)``, ``text_emb (B, L, D)``, ``text_mask (B, L)`` and ``index (B,)``.
    Latents must share a shape (the sampler batches within one bucket).
    """
    if not batch:
        raise ValueError("collate_text got an empty batch")
    shapes = {tuple(item["latent"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"latents of one batch must share a shape, got {sorted(shapes)}")
    longest = max(item["text_emb"].shape[0] for item in batch)
    dim = batch[0]["text_emb"].shape[1]
    emb = batch[0]["text_emb"].new_zeros(len(batch), longest, dim)  # (B, L, D)
    mask = torch.zeros(len(batch), longest, dtype=torch.bool)  # (B, L)
    for i, item in enumerate(batch):
        n = item["text_emb"].shape[0]
        emb[i, :n] = item["text_emb"]
        mask[i, :n] = item["text_mask"]
    return {
        "latent": torch.stack([item["latent"] for item in batch]),
        "text_emb": emb,
        "text_mask": mask,
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }


class CachedClipDataset(Dataset):
    """Item ``i``: ``dict(latent (C, t, h, w), text_emb (L, D), text_mask (L,) bool, index i)``.

    ``codec_identity``/``text_identity`` must be the identities of the codec and text encoder the cache was
    built with (they are part of the keys); ``spec``/``spec_for_row`` must match the builder's too. Rows whose
    file cannot be read have no video key and count as missing.
    """

    def __init__(
        self,
        manifest_path: str | os.PathLike,
        spec: ClipSpec,
        codec_identity: str,
        text_identity: str,
        store: CacheStore,
        *,
        spec_for_row: Callable[[dict[str, Any]], ClipSpec] | None = None,
    ):
        self.manifest_path = Path(manifest_path)
        self.store = store
        self.codec_identity = codec_identity
        self.text_identity = text_identity
        file_ids: dict[str, str] = {}
        self.video_keys: list[str | None] = []
        self.text_keys: list[str] = []
        self.paths: list[str] = []
        for row in iter_rows(read_manifest(self.manifest_path)):
            row_spec = spec_for_row(row) if spec_for_row is not None else spec
            try:
                vkey: str | None = row_video_key(row, self.manifest_path, row_spec, codec_identity, file_ids)
            except OSError:
                vkey = None
            self.video_keys.append(vkey)
            self.text_keys.append(text_key(caption(row), text_identity))
            self.paths.append(str(row["path"]))
        self.empty_text_key = text_key("", text_identity)

    collate = staticmethod(collate_text)  # for DataLoader(collate_fn=dataset.collate)

    def __len__(self) -> int:
        return len(self.video_keys)

    def missing(self) -> list[int]:
        """Row indices whose video or text entry is absent (or unreadable)."""
        return [
            i
            for i, (vkey, tkey) in enumerate(zip(self.video_keys, self.text_keys))
            if vkey is None or not self.store.has("video", vkey) or not self.store.has("text", tkey)
        ]

    def _text(self, key: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.store.get("text", key)
        if entry is None:
            raise CacheMissError(f"{what}: caption embedding not cached (run `frameloom cache` first)")
        return entry["emb"], entry["mask"].bool()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        vkey, path = self.video_keys[index], self.paths[index]
        entry = self.store.get("video", vkey) if vkey is not None else None
        if entry is None:
            raise CacheMissError(f"row {index} ({path}): latent not cached (run `frameloom cache` first)")
        emb, mask = self._text(self.text_keys[index], f"row {index} ({path})")
        return {"latent": entry["latent"], "text_emb": emb, "text_mask": mask, "index": index}

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(emb (L, D), mask (L,))`` (caption dropout, classifier-free guidance)."""
        return self._text(self.empty_text_key, 'the empty prompt ""')
