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

import numpy as np
import torch
from torch.utils.data import Dataset

from frameloom.cache.keys import EXTRA_PREFIX, caption, row_video_key, text_key
from frameloom.cache.store import CacheStore
from frameloom.data.buckets import BucketPolicy
from frameloom.data.captions import CaptionRules
from frameloom.data.manifest import iter_rows, read_manifest
from frameloom.data.video import ClipSpec
from frameloom.errors import FrameloomError

__all__ = ["CachedClipDataset", "CacheMissError", "collate_text"]


class CacheMissError(FrameloomError):
    """A sample whose latent or caption embedding is not in the cache (run ``frameloom cache`` first)."""


def collate_text(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a batch of items; pad the text to the batch's longest caption with zeros and mask ``False``.

    Returns ``latent (B, C, t, h, w)``, ``text_emb (B, L, D)``, ``text_mask (B, L)``, ``index (B,)`` and
    ``text_extras`` ``{name: (B, ...)}`` (the text encoder's extra per-caption tensors; empty for most).
    Latents must share a shape (the sampler batches within one bucket).
    """
    if not batch:
        raise ValueError("collate_text got an empty batch")
    shapes = {tuple(item["latent"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"latents of one batch must share a shape, got {sorted(shapes)}")
    longest = max(item["text_emb"].shape[0] for item in batch)
    extras = {  # per-caption tensors besides the tokens (a pooled vector): (B, ...)
        name: torch.stack([item["text_extras"][name] for item in batch])
        for name in batch[0].get("text_extras", {})
    }
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
        "text_extras": extras,
    }


class CachedClipDataset(Dataset):
    """Item ``i``: ``dict(latent (C, t, h, w), text_emb (L, D), text_mask (L,) bool, index i)``.

    ``codec_identity``/``text_identity`` must be the identities of the codec and text encoder the cache was
    built with (they are part of the keys); ``spec``/``spec_for_row``/``buckets``/``caption_rules`` must
    match the builder's too. Rows whose file cannot be read have no video key and count as missing.

    With ``buckets`` (a bucket policy bound to this manifest) an item is a ``SampleRef(row, bucket, epoch)``
    from the bucketed sampler and reads the entry of the row at that bucket's spec; a plain row index (or a
    ref with bucket -1) reads the row's epoch-0 bucket. ``missing()`` then checks every (row, bucket) pair
    some epoch can assign (``BucketPolicy.reachable``), so a complete cache serves every epoch.
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
        buckets: BucketPolicy | None = None,
        caption_rules: CaptionRules | None = None,
    ):
        if buckets is not None and spec_for_row is not None:
            raise ValueError("give spec_for_row or buckets, not both")
        if caption_rules is not None and caption_rules.per_epoch:
            raise FrameloomError(
                "data.caption_aesthetic=random changes captions per epoch: it cannot be cached"
            )
        self.manifest_path = Path(manifest_path)
        self.store = store
        self.spec = spec
        self.codec_identity = codec_identity
        self.text_identity = text_identity
        self.caption_rules = caption_rules
        self.policy = buckets
        self._assigned: tuple[int, Any] | None = None  # (epoch, bucket per row) for plain-index lookups
        self._table = read_manifest(self.manifest_path)
        self._file_ids: dict[str, str] = {}
        self.video_keys: list[str | None] = []
        self.text_keys: list[str] = []
        self.paths: list[str] = []
        # (row, bucket) -> (video key or None, text key), for every pair a bucket policy can assign
        self.bucket_keys: dict[tuple[int, int], tuple[str | None, str]] = {}
        rows = iter_rows(self._table)
        if buckets is None:
            for row in rows:
                row_spec = spec_for_row(row) if spec_for_row is not None else spec
                vkey, tkey = self._keys(row, row_spec)
                self.video_keys.append(vkey)
                self.text_keys.append(tkey)
                self.paths.append(str(row["path"]))
        else:
            if len(buckets.cols) != self._table.num_rows:
                raise ValueError(
                    f"the bucket policy covers {len(buckets.cols)} rows, the manifest has {self._table.num_rows}"
                )
            pair_rows, pair_buckets = buckets.reachable()  # (P,), (P,) sorted by row
            bounds = np.searchsorted(pair_rows, np.arange(self._table.num_rows + 1))
            for i, row in enumerate(rows):
                self.paths.append(str(row["path"]))
                for b in pair_buckets[bounds[i] : bounds[i + 1]].tolist():
                    self.bucket_keys[(i, b)] = self._keys(row, self._bucket_spec(row, b))
        self.empty_text_key = text_key("", text_identity)

    collate = staticmethod(collate_text)  # for DataLoader(collate_fn=dataset.collate)
    draws_per_epoch = False  # the same entries every epoch: without buckets, the sampler yields row indices

    def _keys(self, row: dict[str, Any], row_spec: ClipSpec) -> tuple[str | None, str]:
        """(video key, or None when the file cannot be read; text key) of a row decoded at ``row_spec``."""
        try:
            vkey: str | None = row_video_key(
                row, self.manifest_path, row_spec, self.codec_identity, self._file_ids
            )
        except OSError:
            vkey = None
        return vkey, text_key(caption(row, self.caption_rules, row_spec), self.text_identity)

    def _bucket_spec(self, row: dict[str, Any], bucket: int) -> ClipSpec:
        return self.policy.clip_spec(self.spec, row.get("fps"), bucket)

    def row(self, i: int) -> dict[str, Any]:
        return self._table.slice(i, 1).to_pylist()[0]

    def use_buckets(self, planner: Any, *, seed: int) -> None:  # noqa: ARG002 (the cache has no random draws)
        """Called by ``sampler.build_sampler``: items become ``SampleRef``s; the planner's policy must be the
        one the keys were computed with (a dataset built without one adopts it, and reads on demand)."""
        policy = None if planner is None else planner.policy
        if policy is None:
            if self.policy is not None:
                raise FrameloomError(
                    "this cached dataset was built for a bucket policy, but data.bucket is none"
                )
            return
        if self.policy is None:
            self.policy, self._assigned = policy, None
            return
        mine, theirs = self.policy.table, policy.table
        same = mine.names == theirs.names and all(
            np.array_equal(getattr(mine, f), getattr(theirs, f)) for f in ("num_frames", "height", "width")
        )
        if not same:
            raise FrameloomError("the sampler's bucket table differs from the one the cached dataset keys on")

    def __len__(self) -> int:
        return len(self.paths)

    def missing(self) -> list[int]:
        """Row indices whose video or text entry is absent (or unreadable); with a bucket policy, rows with
        any reachable (row, bucket) entry absent."""
        has = self.store.has

        def absent(vkey: str | None, tkey: str) -> bool:
            return vkey is None or not has("video", vkey) or not has("text", tkey)

        if self.bucket_keys:
            return sorted({i for (i, _b), keys in self.bucket_keys.items() if absent(*keys)})
        return [i for i, keys in enumerate(zip(self.video_keys, self.text_keys)) if absent(*keys)]

    def _text(self, key: str, what: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        entry = self.store.get("text", key)
        if entry is None:
            raise CacheMissError(f"{what}: caption embedding not cached (run `frameloom cache` first)")
        extras = {k[len(EXTRA_PREFIX) :]: v for k, v in entry.items() if k.startswith(EXTRA_PREFIX)}
        return entry["emb"], entry["mask"].bool(), extras

    def _item_keys(self, index: int, bucket: int, epoch: int) -> tuple[str | None, str]:
        if self.policy is None:
            return self.video_keys[index], self.text_keys[index]
        if bucket < 0:  # a plain index: the row's bucket in `epoch` (assigned once per epoch, not per item)
            if self._assigned is None or self._assigned[0] != epoch:
                self._assigned = (epoch, self.policy.assign(epoch).bucket)
            bucket = int(self._assigned[1][index])
            if bucket < 0:
                raise CacheMissError(f"row {index} ({self.paths[index]}) is in no bucket in epoch {epoch}")
        keys = self.bucket_keys.get((index, bucket))
        if keys is None:  # not a pair the policy's keys were computed for (a policy adopted by use_buckets)
            row = self.row(index)
            keys = self._keys(row, self._bucket_spec(row, bucket))
        return keys

    def __getitem__(self, item: Any) -> dict[str, Any]:
        index, bucket, epoch = tuple(item) if isinstance(item, tuple) else (int(item), -1, 0)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        path = self.paths[index]
        vkey, tkey = self._item_keys(index, bucket, epoch)
        entry = self.store.get("video", vkey) if vkey is not None else None
        if entry is None:
            raise CacheMissError(f"row {index} ({path}): latent not cached (run `frameloom cache` first)")
        emb, mask, extras = self._text(tkey, f"row {index} ({path})")
        return {
            "latent": entry["latent"],
            "text_emb": emb,
            "text_mask": mask,
            "index": index,
            "text_extras": extras,
        }

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(emb (L, D), mask (L,))`` (caption dropout, classifier-free guidance)."""
        return self._text(self.empty_text_key, 'the empty prompt ""')[:2]
