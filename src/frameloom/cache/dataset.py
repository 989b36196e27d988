"""Read training samples from the cache: a manifest's rows as (latent, caption embedding) pairs.

Video keys come from the key index ``frameloom cache`` writes (``cache/index.py``): start-up reads the
manifest and the index, never a video, and ``__getitem__`` is two file reads (a caption's key is a hash of its
text, computed when the item is read). Without an index for this run (a cache built before indexes existed,
or with ``spec_for_row``), every key is computed at construction as before (one ``file_identity`` per
distinct file, which reads 2 MiB of each video), with a warning. ``missing()`` tells the trainer whether the
cache covers the whole manifest; it uses the cache only when nothing is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from frameloom.cache.index import CacheIndex, run_key
from frameloom.cache.keys import EXTRA_PREFIX, caption, row_video_key, text_key
from frameloom.cache.store import CacheStore
from frameloom.data.buckets import BucketPolicy
from frameloom.data.captions import CaptionRules, caption_variants, row_caption
from frameloom.data.manifest import load_manifest
from frameloom.data.paths import PathRules
from frameloom.data.video import ClipSpec, row_fps_or_nan
from frameloom.errors import FrameloomError

__all__ = ["CachedClipDataset", "CacheMissError", "collate_text"]


class CacheMissError(FrameloomError):
    """A sample whose latent or caption embedding is not in the cache (run ``frameloom cache`` first)."""


def collate_text(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a batch of items; pad the text to the batch's longest caption with zeros and mask ``False``.

    Returns ``latent (B, C, t, h, w)``, ``text_emb (B, L, D)``, ``text_mask (B, L)``, ``index (B,)``,
    ``text_extras`` ``{name: (B, ...)}`` (the text encoder's extra per-caption tensors; empty for most) and,
    when the items carry it, ``fps (B,)`` float32 (the clips' sampled frame rates, NaN where unknown).
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
    out = {
        "latent": torch.stack([item["latent"] for item in batch]),
        "text_emb": emb,
        "text_mask": mask,
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
        "text_extras": extras,
    }
    if all("fps" in item for item in batch):
        out["fps"] = torch.tensor([float(item["fps"]) for item in batch], dtype=torch.float32)  # (B,)
    return out


class CachedClipDataset(Dataset):
    """Item ``i``: ``dict(latent (C, t, h, w), text_emb (L, D), text_mask (L,) bool, index i, text_extras,
    fps)``; ``fps`` is the clip's sampled frame rate (float, NaN when unknown): the entry's, or for entries
    cached before they carried it, recomputed from the manifest row and its spec (``data.video.row_fps``).

    ``codec_identity``/``text_identity`` must be the identities of the codec and text encoder the cache was
    built with (they are part of the keys); ``spec``/``spec_for_row``/``buckets``/``caption_rules`` must
    match the builder's too. Rows whose file cannot be read have no video key and count as missing.

    With ``buckets`` (a bucket policy bound to this manifest) an item is a ``SampleRef(row, bucket, epoch)``
    from the bucketed sampler and reads the entry of the row at that bucket's spec; a plain row index (or a
    ref with bucket -1) reads the row's epoch-0 bucket. ``missing()`` then checks every (row, bucket) pair
    some epoch can assign (``BucketPolicy.reachable``), so a complete cache serves every epoch. Under
    ``caption_choice: random`` the caption is drawn per (seed, row, epoch), as on the fly.

    ``rules``: the manifest's paths are checked on load (``manifest.check_paths``). ``use_index=False``
    computes every key at construction instead of reading the key index.
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
        rules: PathRules | None = None,
        use_index: bool = True,
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
        self.spec_for_row = spec_for_row
        self.codec_identity = codec_identity
        self.text_identity = text_identity
        self.caption_rules = caption_rules
        self.policy = buckets
        self.seed = 0
        self._assigned: tuple[int, Any] | None = None  # (epoch, bucket per row) for plain-index lookups
        self._table = load_manifest(self.manifest_path, rules)
        self._paths = self._table.column("path")
        self._file_ids: dict[str, str] = {}
        self.empty_text_key = text_key("", text_identity)
        if buckets is not None and len(buckets.cols) != self._table.num_rows:
            raise ValueError(
                f"the bucket policy covers {len(buckets.cols)} rows, the manifest has {self._table.num_rows}"
            )
        self.index: CacheIndex | None = None
        if use_index and spec_for_row is None:
            run = run_key(self.manifest_path, spec, codec_identity, text_identity, caption_rules, buckets)
            self.index = CacheIndex.load(store.root, run)
        # Without an index: (row, bucket) -> video key (None: unreadable file), computed now (reads every video).
        self._keys: dict[tuple[int, int], str | None] | None = None
        if self.index is None:
            if self._table.num_rows:
                logging.getLogger("frameloom.cache").warning(
                    "no key index for this cache and run: computing the keys of %d rows (reads 2 MiB of every "
                    "video); `frameloom cache` writes the index",
                    self._table.num_rows,
                )
            self._keys = {}
            rows_, buckets_ = self._pairs()
            for i, b in zip(rows_.tolist(), buckets_.tolist()):
                row = self.row(i)
                self._keys[(i, b)] = self._video_key_of(row, self._spec_of(row, b))

    collate = staticmethod(collate_text)  # for DataLoader(collate_fn=dataset.collate)

    @property
    def draws_per_epoch(self) -> bool:
        """Whether items depend on the epoch (a caption drawn per epoch); without buckets the sampler then
        hands out refs with the epoch instead of plain row indices."""
        return (
            self.caption_rules is not None
            and self.caption_rules.choice == "random"
            and "captions" in self._table.column_names
            and self._table.column("captions").null_count < self._table.num_rows
        )

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, bucket) pair training can ask for: the policy's reachable pairs, or (row, -1)."""
        if self.policy is None:
            n = self._table.num_rows
            return np.arange(n, dtype=np.int64), np.full(n, -1, np.int64)
        return self.policy.reachable()

    def _spec_of(self, row: dict[str, Any], bucket: int) -> ClipSpec:
        if self.policy is not None and bucket >= 0:
            return self.policy.clip_spec(self.spec, row.get("fps"), bucket)
        return self.spec_for_row(row) if self.spec_for_row is not None else self.spec

    def _text_keys_of(self, row: dict[str, Any], spec: ClipSpec) -> list[str]:
        return [text_key(t, self.text_identity) for t in caption_variants(row, self.caption_rules, spec)]

    def _video_key_of(self, row: dict[str, Any], row_spec: ClipSpec) -> str | None:
        """The video key of a row decoded at ``row_spec`` (reads the file's identity); None if unreadable."""
        try:
            return row_video_key(row, self.manifest_path, row_spec, self.codec_identity, self._file_ids)
        except OSError:
            return None

    # Kept for tools and tests: the keys of every row without a bucket policy (computed on demand).
    @property
    def video_keys(self) -> list[str | None]:
        return [self._video_key(i, -1) for i in range(len(self))]

    @property
    def text_keys(self) -> list[str]:
        return [
            text_key(caption(self.row(i), self.caption_rules, self.spec), self.text_identity)
            for i in range(len(self))
        ]

    def row(self, i: int) -> dict[str, Any]:
        return self._table.slice(i, 1).to_pylist()[0]

    def use_buckets(self, planner: Any, *, seed: int) -> None:
        """Called by ``sampler.build_sampler``: items become ``SampleRef``s; the planner's policy must be the
        one the keys were computed with (a dataset built without one adopts it, and reads on demand). ``seed``
        drives the per-epoch caption choice."""
        self.seed = int(seed)
        policy = None if planner is None else planner.policy
        if policy is None:
            if self.policy is not None:
                raise FrameloomError(
                    "this cached dataset was built for a bucket policy, but data.bucket is none"
                )
            return
        if self.policy is None:
            self.policy, self._assigned = policy, None
            self.index = None  # the index was read for no policy; keys are now computed per item
            self._keys = {}
            return
        mine, theirs = self.policy.table, policy.table
        same = mine.names == theirs.names and all(
            np.array_equal(getattr(mine, f), getattr(theirs, f)) for f in ("num_frames", "height", "width")
        )
        if not same:
            raise FrameloomError("the sampler's bucket table differs from the one the cached dataset keys on")

    def __len__(self) -> int:
        return self._table.num_rows

    def _video_key(self, index: int, bucket: int) -> str | None:
        if self.index is not None:
            return self.index.video_key(index, bucket)
        assert self._keys is not None
        if (
            index,
            bucket,
        ) not in self._keys:  # not a pair computed at start (a policy adopted by use_buckets)
            row = self.row(index)
            self._keys[(index, bucket)] = self._video_key_of(row, self._spec_of(row, bucket))
        return self._keys[(index, bucket)]

    def missing(self) -> list[int]:
        """Row indices whose video or text entry is absent (or unreadable); with a bucket policy, rows with
        any reachable (row, bucket) entry absent.

        With the key index: the pairs the index marks incomplete or lacks, plus a spot check that the store
        still holds the entries of a few dozen rows (a store cleared or damaged after the build): if one is
        gone, every entry is checked. Without an index: every entry is checked."""
        rows, buckets = self._pairs()
        if self.index is not None:
            ready = self.index.ready(rows, buckets)
            absent = set(rows[~ready].tolist())
            good = np.flatnonzero(ready)
            probe = (
                good[np.linspace(0, len(good) - 1, min(len(good), 32)).astype(np.int64)]
                if len(good)
                else good
            )
            if all(self._present(int(rows[k]), int(buckets[k])) for k in probe.tolist()):
                return sorted(absent)
            good_pairs = [(int(rows[k]), int(buckets[k])) for k in good.tolist()]
            return sorted(absent | {i for i, b in good_pairs if not self._present(i, b)})
        return sorted({i for i, b in zip(rows.tolist(), buckets.tolist()) if not self._present(i, b)})

    def _present(self, index: int, bucket: int) -> bool:
        has = self.store.has
        vkey = self._video_key(index, bucket)
        if vkey is None or not has("video", vkey):
            return False
        row = self.row(index)
        return all(has("text", k) for k in self._text_keys_of(row, self._spec_of(row, bucket)))

    def _text(self, key: str, what: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        entry = self.store.get("text", key)
        if entry is None:
            raise CacheMissError(f"{what}: caption embedding not cached (run `frameloom cache` first)")
        extras = {k[len(EXTRA_PREFIX) :]: v for k, v in entry.items() if k.startswith(EXTRA_PREFIX)}
        return entry["emb"], entry["mask"].bool(), extras

    def _bucket_of(self, index: int, bucket: int, epoch: int) -> int:
        if self.policy is None or bucket >= 0:
            return bucket if self.policy is not None else -1
        # a plain index: the row's bucket in `epoch` (assigned once per epoch, not per item)
        if self._assigned is None or self._assigned[0] != epoch:
            self._assigned = (epoch, self.policy.assign(epoch).bucket)
        found = int(self._assigned[1][index])
        if found < 0:
            raise CacheMissError(f"row {index} ({self._paths[index]}) is in no bucket in epoch {epoch}")
        return found

    def __getitem__(self, item: Any) -> dict[str, Any]:
        index, bucket, epoch = tuple(item) if isinstance(item, tuple) else (int(item), -1, 0)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        path = self._paths[index].as_py()
        bucket = self._bucket_of(index, bucket, epoch)
        row = self.row(index)
        vkey = self._video_key(index, bucket)
        entry = self.store.get("video", vkey) if vkey is not None else None
        if entry is None:
            raise CacheMissError(f"row {index} ({path}): latent not cached (run `frameloom cache` first)")
        spec = self._spec_of(row, bucket)
        text = row_caption(row, self.caption_rules, spec, (self.seed, index, epoch))
        emb, mask, extras = self._text(text_key(text, self.text_identity), f"row {index} ({path})")
        # an entry cached before entries carried the rate: the same pure function of row and spec
        fps = float(entry["fps"].reshape(-1)[0]) if "fps" in entry else row_fps_or_nan(row, spec)
        return {
            "latent": entry["latent"],
            "text_emb": emb,
            "text_mask": mask,
            "index": index,
            "text_extras": extras,
            "fps": fps,
        }

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(emb (L, D), mask (L,))`` (caption dropout, classifier-free guidance)."""
        return self._text(self.empty_text_key, 'the empty prompt ""')[:2]
